"""Hugging Face ``datasets``: in memory, saved with ``save_to_disk``, data files in a folder, or on the Hub."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from lcm.data.base import MapSource, Sample, check_caption, listing, resolve_caption_column
from lcm.data.transforms import ImageTransform
from lcm.locations import hub_unavailable

__all__ = ["HFDatasetSource", "has_data_files", "import_datasets", "is_saved_dataset"]

# Markers that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
_SAVED_DATASET_DICT_FILE = "dataset_dict.json"
_DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}


class HFDatasetSource(MapSource):
    """A Hugging Face dataset: an in-memory ``datasets.Dataset``, a ``save_to_disk`` folder or a Hub name.

    Captions are checked when the source is built (only the caption column is read); images are decoded by PIL
    per item, so a corrupt one makes ``__getitem__`` return ``None`` (see :func:`collate_skip_none`) instead of
    raising inside ``datasets``. Requires ``pip install datasets``.
    """

    def __init__(
        self,
        dataset: str | os.PathLike | Any,
        transform: ImageTransform,
        *,
        image_column: str = "image",
        caption_column: str | None = None,
        split: str = "train",
        seed: int | None = None,
    ) -> None:
        super().__init__(transform, seed)
        datasets = import_datasets()
        if isinstance(dataset, (str, os.PathLike)):
            self.name = str(dataset)
            dataset = _load_hf_dataset(datasets, self.name, split)
        else:
            self.name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "dataset"
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"{self.name}: expected a datasets.Dataset, got {type(dataset).__name__}")
        columns = dataset.column_names
        if image_column not in columns:
            raise ValueError(
                f"{self.name}: image column {image_column!r} not found; available columns: {listing(columns)}. "
                "Pass image_column= the one that holds the images."
            )
        self.image_column = image_column
        self.caption_column = resolve_caption_column(caption_column, columns, self.name)
        if isinstance(dataset.features[image_column], datasets.Image):
            # Undecoded bytes, so that PIL decodes them here and a corrupt image is skipped, not raised.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self._rows: list[int] = []
        self._captions: list[str | list[str]] = []
        for row, value in enumerate(dataset[self.caption_column]):
            caption, reason = check_caption(value)
            if reason is not None:
                self.skipped.add(reason, f"row {row}")
            else:
                self._rows.append(row)
                self._captions.append(caption)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index``, or ``None`` if its image cannot be decoded (counted in ``.skipped``)."""
        row = self._rows[index]
        value = self.dataset[row][self.image_column]
        return self._make_sample(_image_source(value), self._captions[index], f"row {row}", index)


def _image_source(value: Any) -> str | bytes | None:
    """Bytes or a path from whatever an image column holds (an undecoded ``Image`` dict, bytes or a path)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, (bytes, str)):
        return value
    return None


def import_datasets() -> Any:
    """The ``datasets`` module; ``ValueError`` with the install line when it is missing."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "Hugging Face datasets need the `datasets` package: pip install datasets "
            "(or use an image folder with metadata.jsonl, or WebDataset .tar shards)"
        ) from err
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return all((path / name).is_file() for name in _SAVED_DATASET_FILES) or (path / _SAVED_DATASET_DICT_FILE).is_file()


def _load_hf_dataset(datasets: Any, name: str, split: str) -> Any:
    path = Path(name).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name}: no split {split!r}; available splits: {listing(loaded.keys())}")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(path) if path.exists() else name, split=split)
    except Exception as err:  # hub, network and format errors alike: one actionable line, cause chained
        local = "" if path.exists() else f" (no local path {path.resolve()} either)"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not path.exists() and (reason := hub_unavailable(name, "README.md", repo_type="dataset")):
            message = reason
        raise ValueError(f"could not load Hugging Face dataset {name!r}, split {split!r}{local}: {message}") from err


def has_data_files(path: Path) -> bool:
    """Whether any file under ``path`` is a table ``datasets.load_dataset`` reads (parquet, arrow, csv, json)."""
    return any(item.suffix.lower() in _DATA_FILE_SUFFIXES for item in path.rglob("*"))
