"""Image–caption data for latent consistency distillation / fine-tuning.

Every source yields samples ``{"pixel_values": FloatTensor [C, H, W] in [-1, 1], "caption": str}``:

- :class:`ImageFolderSource`  a folder of images plus ``metadata.jsonl`` (the Hugging Face ``imagefolder`` layout)
- :class:`HFDatasetSource`    a Hugging Face dataset, saved on disk (``save_to_disk``) or on the Hub
- :class:`WebDatasetSource`   WebDataset ``.tar`` shards (local, brace patterns, http(s) or ``pipe:`` URLs)
- :func:`build_source`        picks one of the above from a single string

Bad data never stops training. Missing or empty captions are found when a source is built (they are cheap to
check); unreadable images only when they are decoded. Every skip is counted by reason in the source's
``.skipped`` (:class:`SkipCounter`). Map-style sources return ``None`` for an unreadable image, so use them with
``DataLoader(..., collate_fn=collate_skip_none)``, which drops those items::

    source = build_source("data/pokemon", resolution=512)
    loader = DataLoader(source, batch_size=8, shuffle=True, collate_fn=collate_skip_none)
    for batch in loader:
        if batch is None:  # every item of this batch was unreadable
            continue
        ...
    print(source.skipped.summary())

Counts are kept in the process that does the work: with ``num_workers=0`` ``.skipped`` is complete; with workers
each worker counts into its own copy, so the main process sees only what was found at construction plus, per
batch, ``batch["num_skipped"]`` (the items :func:`collate_skip_none` dropped).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import subprocess
import tarfile
import threading
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = [
    "HFDatasetSource",
    "ImageFolderSource",
    "ImageTransform",
    "Sample",
    "SkipCounter",
    "WebDatasetSource",
    "build_source",
    "collate_skip_none",
    "expand_braces",
    "group_samples",
    "open_image",
    "to_mode",
]

logger = logging.getLogger(__name__)

# Skip reasons, shared by every source so that summaries read the same.
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
NON_TEXT_CAPTION = "non-text caption"
UNREADABLE_CAPTION = "unreadable caption"
MISSING_IMAGE = "missing image"
MISSING_IMAGE_FILE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
INVALID_METADATA = "invalid metadata line"
UNREADABLE_SHARD = "unreadable shard"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
METADATA_FILE = "metadata.jsonl"
# Markers that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
_SAVED_DATASET_DICT_FILE = "dataset_dict.json"
# What PIL (and the streams under it) raise for a corrupt, truncated or exotic image.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# What a shard stream raises when it is truncated, missing or cut off mid-download.
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class Sample(TypedDict):
    """One training example."""

    pixel_values: torch.Tensor
    caption: str


# --------------------------------------------------------------------------------------------------------------------
# Image transform


@dataclass(frozen=True)
class ImageTransform:
    """Stable Diffusion training policy: shorter side → ``resolution``, square crop, optional flip, [-1, 1].

    ``center_crop=False`` crops at a random position and ``random_flip=True`` flips horizontally with probability
    1/2; both draw from ``generator`` (the global torch RNG when ``None``), crop first, then flip.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    channels: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution must be a positive integer number of pixels, got {self.resolution!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 3 (RGB) or 1 (greyscale), got {self.channels!r}")

    @property
    def is_random(self) -> bool:
        """Whether the output depends on the generator."""
        return not self.center_crop or self.random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """``image`` (any PIL mode) → float32 tensor ``[channels, resolution, resolution]`` in [-1, 1]."""
        image = to_mode(image, "RGB" if self.channels == 3 else "L")
        image = self._resize(image)
        image = self._crop(image, generator)
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image)

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short == self.resolution:
            return image
        # Same rounding as torchvision's Resize(int): the long side is truncated, not rounded.
        new_long = int(self.resolution * long / short)
        size = (self.resolution, new_long) if width <= height else (new_long, self.resolution)
        # PIL's bilinear filter widens its support when downscaling, i.e. it is antialiased.
        return image.resize(size, Image.Resampling.BILINEAR)

    def _crop(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        width, height = image.size
        res = self.resolution
        if self.center_crop:
            top, left = int(round((height - res) / 2.0)), int(round((width - res) / 2.0))
        else:
            top = int(torch.randint(0, height - res + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - res + 1, (1,), generator=generator))
        return image.crop((left, top, left + res, top + res))


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to ``"RGB"`` or ``"L"``.

    Transparent pixels are composited on white: plain ``convert("RGB")`` would expose whatever colour the encoder
    left under them (often black, sometimes noise). 16-bit and float greyscale are rescaled, because PIL's own
    conversion clips them to 255 instead.
    """
    if image.mode == mode:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    elif image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(mode)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 65535 → 255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)  # a writable copy, which torch.from_numpy wants
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor.to(torch.float32) / 127.5 - 1.0


def open_image(source: str | os.PathLike | bytes) -> Image.Image | None:
    """Decode an image fully from a path or bytes; ``None`` when it is missing, corrupt or truncated."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # PIL decodes lazily: force it here so that a truncated file fails now, not mid-transform
        try:
            image = ImageOps.exif_transpose(image)
        except _IMAGE_ERRORS:
            pass  # a malformed EXIF block should not cost the image: keep it unrotated
        return image
    except _IMAGE_ERRORS:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Skips


class SkipCounter:
    """Skipped samples counted by reason; each ``(reason, key)`` pair counts once, however often it is met.

    Safe to share between threads. DataLoader worker *processes* each get their own copy: with ``num_workers > 0``
    merge their counters with :meth:`update` if you collect them, or read the per-batch ``num_skipped``.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, key: object) -> bool:
        """Record that sample ``key`` was skipped for ``reason``; ``False`` if that was already recorded."""
        item = (reason, str(key))
        with self._lock:
            if item in self._seen:
                return False
            self._seen.add(item)
            first = reason not in self._counts
            self._counts[reason] = self._counts.get(reason, 0) + 1
            examples = self._examples.setdefault(reason, [])
            if len(examples) < self.max_examples:
                examples.append(item[1])
        # One warning per reason: a dataset with thousands of bad rows should not flood the training log.
        log = logger.warning if first else logger.debug
        log("skipping sample %s: %s", item[1], reason)
        return True

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the per-reason counts."""
        with self._lock:
            return dict(self._counts)

    def examples(self, reason: str) -> list[str]:
        """The first few keys skipped for ``reason`` (to find the bad files)."""
        with self._lock:
            return list(self._examples.get(reason, []))

    def update(self, other: SkipCounter) -> None:
        """Merge another counter (e.g. one collected from a DataLoader worker) into this one."""
        with other._lock:
            items = sorted(other._seen)
        for reason, key in items:
            self.add(reason, key)

    def summary(self) -> str:
        """One line, most frequent reason first: ``"skipped 3 samples: 2 unreadable image, 1 missing caption"``."""
        counts = self.counts
        total = sum(counts.values())
        noun = "sample" if total == 1 else "samples"
        if not total:
            return f"skipped 0 {noun}"
        parts = [f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return f"skipped {total} {noun}: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Locks cannot be pickled, and DataLoader workers started with "spawn" pickle the dataset.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def collate_skip_none(batch: Sequence[Sample | None]) -> dict[str, Any] | None:
    """Collate samples, dropping ``None`` (unreadable) items; ``None`` if nothing is left.

    Returns ``{"pixel_values": [B, C, H, W], "caption": list[str], "num_skipped": int}``; ``B`` may be smaller
    than the loader's batch size when items were dropped.
    """
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in kept]),
        "caption": [sample["caption"] for sample in kept],
        "num_skipped": len(batch) - len(kept),
    }


def _check_caption(value: Any) -> tuple[str | list[str] | None, str | None]:
    """``(caption, None)`` for a usable caption (a string or several to choose from), else ``(None, reason)``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, MISSING_CAPTION
    if isinstance(value, str):
        text = value.strip()
        return (text, None) if text else (None, EMPTY_CAPTION)
    if isinstance(value, (list, tuple, np.ndarray)):
        if not all(isinstance(item, str) for item in value):
            return None, NON_TEXT_CAPTION
        texts = [item.strip() for item in value if item.strip()]
        return (texts, None) if texts else (None, EMPTY_CAPTION)
    return None, NON_TEXT_CAPTION


def _choose_caption(caption: str | list[str], generator: torch.Generator | None) -> str:
    # Several captions per image (COCO style): pick one per visit, as diffusers' training scripts do.
    if isinstance(caption, str):
        return caption
    if len(caption) == 1:
        return caption[0]
    return caption[int(torch.randint(0, len(caption), (1,), generator=generator))]


def _derived_seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(*parts))


def _resolve_caption_column(requested: str | None, available: Iterable[str], source: str) -> str:
    """The caption column to use: ``requested``, else ``"text"``, else ``"caption"``."""
    names = set(available)
    if requested is not None:
        if requested not in names:
            raise ValueError(
                f"{source}: caption column {requested!r} not found; available columns: {_listing(names)}. "
                "Pass caption_column= one of those."
            )
        return requested
    for candidate in ("text", "caption"):
        if candidate in names:
            return candidate
    raise ValueError(
        f"{source}: no caption column ('text' or 'caption'); available columns: {_listing(names)}. "
        "Pass caption_column= the one that holds the captions."
    )


def _listing(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "(none)"


# --------------------------------------------------------------------------------------------------------------------
# Map-style sources


class _MapSource(Dataset):
    """Shared by the map-style sources: valid rows found at construction, images decoded per item."""

    def __init__(self, transform: ImageTransform, seed: int | None) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Vary the seeded augmentations per epoch (only matters when ``seed`` is set)."""
        self.epoch = epoch

    def _item_generator(self, index: int) -> torch.Generator | None:
        # With a seed, item i of epoch e is the same crop/flip/caption whichever worker or order loads it.
        return None if self.seed is None else _generator(self.seed, self.epoch, index)

    def _make_sample(
        self, image_source: str | os.PathLike | bytes | None, caption: str | list[str], key: str, index: int
    ) -> Sample | None:
        image = open_image(image_source) if image_source is not None else None
        if image is None:
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        generator = self._item_generator(index)
        try:
            pixels = self.transform(image, generator)
        except _IMAGE_ERRORS:  # an image mode PIL cannot convert is as unusable as a corrupt file
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        return {"pixel_values": pixels, "caption": _choose_caption(caption, generator)}


class ImageFolderSource(_MapSource):
    """Images under ``root`` (any depth) captioned by ``root/metadata.jsonl`` (Hugging Face ``imagefolder``).

    Each metadata line is a JSON object such as ``{"file_name": "cats/1.png", "text": "a cat"}``. Rows with a
    missing image file or a missing / empty caption are skipped when the source is built; unreadable images when
    they are loaded, where ``__getitem__`` returns ``None`` (see :func:`collate_skip_none`). Rows keep the order
    of the metadata file. With ``seed`` set, random crops, flips and caption choices depend only on
    ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: ImageTransform,
        *,
        caption_column: str | None = None,
        image_column: str = "file_name",
        seed: int | None = None,
    ) -> None:
        super().__init__(transform, seed)
        self.root = Path(root).expanduser()
        metadata = self._metadata_path(self.root)
        rows = self._read_metadata(metadata)
        if not rows:
            raise ValueError(f"{metadata} has no JSON object lines ({self.skipped.summary()})")
        self.caption_column = _resolve_caption_column(
            caption_column, {name for _, row in rows for name in row}, str(metadata)
        )
        self.image_column = image_column
        self._items: list[tuple[str, str | list[str]]] = []
        for key, row in rows:
            self._add_row(key, row)

    @staticmethod
    def _metadata_path(root: Path) -> Path:
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a directory")
        metadata = root / METADATA_FILE
        if metadata.is_file():
            return metadata
        hint = " (found metadata.csv: convert it to JSON lines)" if (root / "metadata.csv").is_file() else ""
        raise ValueError(
            f"{root} has no {METADATA_FILE}{hint}. Expected layout: image files anywhere under the folder and "
            f'{root / METADATA_FILE} with one JSON object per line, e.g. {{"file_name": "images/0001.png", '
            '"text": "a photo of a cat"}, file_name relative to the folder.'
        )

    def _read_metadata(self, path: Path) -> list[tuple[str, dict[str, Any]]]:
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line_number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                key = f"{METADATA_FILE}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    rows.append((key, row))
                else:
                    self.skipped.add(INVALID_METADATA, key)
        return rows

    def _add_row(self, line_key: str, row: dict[str, Any]) -> None:
        file_name = row.get(self.image_column)
        if not isinstance(file_name, str) or not file_name:
            self.skipped.add(INVALID_METADATA, line_key)
            return
        caption, reason = _check_caption(row.get(self.caption_column))
        if reason is not None:
            self.skipped.add(reason, file_name)
            return
        if not (self.root / file_name).is_file():
            self.skipped.add(MISSING_IMAGE_FILE, file_name)
            return
        self._items.append((file_name, caption))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index``, or ``None`` if its image cannot be decoded (counted in ``.skipped``)."""
        file_name, caption = self._items[index]
        return self._make_sample(self.root / file_name, caption, file_name, index)


class HFDatasetSource(_MapSource):
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
        datasets = _import_datasets()
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
                f"{self.name}: image column {image_column!r} not found; available columns: {_listing(columns)}. "
                "Pass image_column= the one that holds the images."
            )
        self.image_column = image_column
        self.caption_column = _resolve_caption_column(caption_column, columns, self.name)
        if isinstance(dataset.features[image_column], datasets.Image):
            # Undecoded bytes, so that PIL decodes them here and a corrupt image is skipped, not raised.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self._rows: list[int] = []
        self._captions: list[str | list[str]] = []
        for row, value in enumerate(dataset[self.caption_column]):
            caption, reason = _check_caption(value)
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


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "Hugging Face datasets need the `datasets` package: pip install datasets "
            "(or use an image folder with metadata.jsonl, or WebDataset .tar shards)"
        ) from err
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return all((path / name).is_file() for name in _SAVED_DATASET_FILES) or (path / _SAVED_DATASET_DICT_FILE).is_file()


def _load_hf_dataset(datasets: Any, name: str, split: str) -> Any:
    path = Path(name).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name}: no split {split!r}; available splits: {_listing(loaded.keys())}")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(path) if path.exists() else name, split=split)
    except Exception as err:  # hub, network and format errors alike: one actionable line, cause chained
        local = "" if path.exists() else f" (no local path {path.resolve()} either)"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"could not load Hugging Face dataset {name!r}, split {split!r}{local}: {message}") from err


# --------------------------------------------------------------------------------------------------------------------
# WebDataset


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``"s-{000..002}.tar"`` → s-000, s-001, s-002; ``"{a,b}.tar"`` → a.tar, b.tar.

    Numeric ranges keep zero padding and accept a step (``{0..10..5}``); groups nest and multiply left to right.
    ``"::"`` joins several patterns, as in WebDataset URLs.
    """
    if "::" in pattern:
        return [url for part in pattern.split("::") if part for url in expand_braces(part)]
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    if "}" in pattern[:start]:
        raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
    end = _matching_brace(pattern, start)
    prefix, body, suffix = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    alternatives = _brace_alternatives(body)
    if alternatives is None:  # "{x}" without a comma or range is literal text, as in bash
        alternatives = ["{" + item + "}" for item in expand_braces(body)] if body else ["{}"]
        return [prefix + alt + rest for alt in alternatives for rest in expand_braces(suffix)]
    tails = expand_braces(suffix)
    return [prefix + head + tail for alt in alternatives for head in expand_braces(alt) for tail in tails]


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")


def _brace_alternatives(body: str) -> list[str] | None:
    """The items of a brace group, or ``None`` when it is neither a list nor a range."""
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    if len(parts) > 1:
        return parts
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    return _numeric_range(*match.groups()) if match else None


def _numeric_range(first: str, last: str, step: str | None) -> list[str]:
    lo, hi, stride = int(first), int(last), abs(int(step)) if step else 1
    if stride == 0:
        raise ValueError(f"brace range {{{first}..{last}..{step}}} has a step of 0")
    # Bash pads every item to the widest endpoint when either endpoint has a leading zero.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(lo, hi + 1, stride) if lo <= hi else range(lo, hi - 1, -stride)
    return [f"{value:0{width}d}" for value in values]


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


def _open_shard(url: str) -> tuple[IO[bytes], subprocess.Popen | None]:
    """A byte stream for a shard: a local file, an http(s) download or the stdout of a ``pipe:`` command."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60), None
    if url.startswith("pipe:"):
        # The command comes from the user's own shard spec (WebDataset's convention for s3/gcs/curl).
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        return process.stdout, process
    return open(_local_path(url), "rb"), None


def _tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    # Streaming mode ("r|*"): no seeking, so URLs and pipes work, and gzip-compressed shards too.
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                yield member.name, handle.read()


def _split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset naming: ``dir/key.ext1.ext2`` → (``dir/key``, ``ext1.ext2``); ``(None, "")`` for non-samples."""
    name = name[2:] if name.startswith("./") else name
    directory, base = posixpath.split(name)
    dot = base.find(".")
    # No dot ("__meta__"), a hidden file (".x", "._x.jpg" from macOS) or a trailing dot is not part of a sample.
    if dot <= 0 or dot == len(base) - 1:
        return None, ""
    return posixpath.join(directory, base[:dot]), base[dot + 1 :].lower()


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key: ``(key, {extension: bytes})``, one per sample, the last one included.

    Unlike the grouping that broke diffusers' script on newer ``webdataset`` releases, nothing but real samples
    is ever yielded (no ``__url__``-only dict at the end of a shard).
    """
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in members:
        member_key, extension = _split_member_name(name)
        if member_key is None:
            continue
        # A repeated extension under the same key means two samples that share a name: keep both.
        if sample and (member_key != key or extension in sample):
            yield key, sample
            sample = {}
        key = member_key
        sample[extension] = data
    if sample:
        yield key, sample


class WebDatasetSource(IterableDataset):
    """WebDataset ``.tar`` shards, read with Python's ``tarfile`` (the ``webdataset`` package is not needed).

    ``urls`` is one spec or several: local paths, brace patterns (``"shards/{000..009}.tar"``), ``http(s)://`` URLs
    or ``pipe:COMMAND``; ``"::"`` joins specs. Each sample is the tar members sharing a key; its image is the first
    of ``image_key`` (``;``-separated extensions, default ``jpg;jpeg;png;webp``) and its caption the ``.txt`` member,
    else the ``"caption"`` or ``"text"`` field of a ``.json`` member (``caption_key`` names another extension / field).

    Shards are shuffled per epoch (the same order on every rank, from ``seed`` and :meth:`set_epoch`) and split
    over ``world_size`` ranks × DataLoader workers. With fewer shards than that, every reader streams all shards and
    keeps every n-th sample instead. ``rank`` / ``world_size`` default to ``torch.distributed`` when it is
    initialised. Ranks may get different sample counts: for multi-GPU training count steps and use ``repeat=True``.
    ``shuffle_buffer`` > 0 shuffles samples within a window of that many. Bad samples and unreadable shards are
    skipped and counted in ``.skipped`` (in the reading process: per worker when ``num_workers > 0``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: ImageTransform,
        *,
        image_key: str | None = None,
        caption_key: str | None = None,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        repeat: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = self._expand(urls)
        self.transform = transform
        self.image_keys = tuple(ext.strip().lower() for ext in (image_key or ";".join(IMAGE_EXTENSIONS)).split(";"))
        self.caption_key = caption_key
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 disables sample shuffling), got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.epoch = 0
        self.skipped = SkipCounter()

    @staticmethod
    def _expand(urls: str | Sequence[str]) -> list[str]:
        specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
        shards = [url for spec in specs for url in expand_braces(os.fspath(spec))]
        if not shards:
            raise ValueError("no WebDataset shards given: pass a .tar path, a brace pattern or a list of URLs")
        missing = [url for url in shards if not _is_remote(url) and not _local_path(url).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(shards)} WebDataset shards do not exist, first: {missing[0]} "
                "(check the path and the brace range)"
            )
        return shards

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards for ``epoch``; call before each epoch (reaches workers unless they are persistent)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        reader, readers = self._reader_index()
        epoch = self.epoch
        while True:
            produced = 0
            for sample in self._shuffled(self._epoch_samples(epoch, reader, readers), epoch, reader):
                produced += 1
                yield sample
            if not self.repeat:
                return
            if not produced:
                raise ValueError(
                    f"a full pass over {len(self.shards)} shards gave reader {reader} of {readers} no usable "
                    f"sample ({self.skipped.summary()}); check the shards and the image/caption keys"
                )
            epoch += 1

    def _reader_index(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _epoch_samples(self, epoch: int, reader: int, readers: int) -> Iterator[Sample]:
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(_derived_seed(self.seed, epoch)).shuffle(shards)  # same order on every reader
        by_shard = len(shards) >= readers
        mine = shards[reader::readers] if by_shard else shards
        generator = _generator(self.seed, epoch, reader)
        position = 0
        for url in mine:
            for key, members in self._shard_samples(url):
                position += 1
                # Too few shards to share out: every reader reads them all and keeps its own n-th samples.
                if not by_shard and (position - 1) % readers != reader:
                    continue
                sample = self._decode(f"{url}#{key}", members, generator)
                if sample is not None:
                    yield sample

    def _shard_samples(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        process, completed = None, False
        try:
            stream, process = _open_shard(url)
            with stream:
                yield from group_samples(_tar_members(stream))
            completed = True
        except _SHARD_ERRORS as err:
            logger.warning("WebDataset shard %s: %s", url, err)
            self.skipped.add(UNREADABLE_SHARD, url)
        finally:
            if process is not None:
                if not completed:
                    process.kill()  # the consumer stopped early (or the stream failed): don't wait on a full pipe
                if process.wait() != 0 and completed:
                    logger.warning("WebDataset shard %s: command exited with status %s", url, process.returncode)
                    self.skipped.add(UNREADABLE_SHARD, url)

    def _shuffled(self, samples: Iterator[Sample], epoch: int, reader: int) -> Iterator[Sample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(_derived_seed(self.seed, epoch, reader, "buffer"))
        buffer: list[Sample] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, key: str, members: dict[str, bytes], generator: torch.Generator) -> Sample | None:
        caption, reason = self._caption(members)
        if reason is None:
            caption, reason = _check_caption(caption)
        if reason is not None:
            self.skipped.add(reason, key)
            return None
        extension = next((ext for ext in self.image_keys if ext in members), None)
        if extension is None:
            self.skipped.add(MISSING_IMAGE, key)
            return None
        image = open_image(members[extension])
        try:
            pixels = self.transform(image, generator) if image is not None else None
        except _IMAGE_ERRORS:  # an image mode PIL cannot convert is as unusable as a corrupt file
            pixels = None
        if pixels is None:
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        return {"pixel_values": pixels, "caption": _choose_caption(caption, generator)}

    def _caption(self, members: dict[str, bytes]) -> tuple[Any, str | None]:
        extension = self.caption_key or "txt"
        if extension in members:
            try:
                return members[extension].decode("utf-8-sig"), None
            except UnicodeDecodeError:
                return None, UNREADABLE_CAPTION
        if "json" not in members:
            return None, MISSING_CAPTION
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, UNREADABLE_CAPTION
        fields = (self.caption_key,) if self.caption_key else ("caption", "text")
        if not isinstance(meta, dict) or not any(field in meta for field in fields):
            return None, MISSING_CAPTION
        return next(meta[field] for field in fields if field in meta), None


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


# --------------------------------------------------------------------------------------------------------------------
# Factory


def build_source(
    spec: str | os.PathLike,
    *,
    resolution: int,
    image_column: str | None = None,
    caption_column: str | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    channels: int = 3,
    split: str = "train",
    seed: int | None = None,
) -> ImageFolderSource | HFDatasetSource | WebDatasetSource:
    """The source ``spec`` names, transformed with :class:`ImageTransform` (``resolution``, crop, flip, channels).

    - a folder with ``metadata.jsonl`` (or ``<split>/metadata.jsonl``) → :class:`ImageFolderSource`
      (``image_column``: the metadata key of the file name, default ``file_name``)
    - a folder written by ``datasets``' ``save_to_disk`` → :class:`HFDatasetSource`
    - ``.tar`` / ``.tar.gz`` / ``.tgz`` paths or URLs, brace patterns, ``pipe:`` commands → :class:`WebDatasetSource`
      (``image_column``: ``;``-separated image extensions; ``caption_column``: the caption extension or JSON field)
    - any other folder of data files, or a Hub name such as ``"lambdalabs/naruto-blip-captions"``
      → :class:`HFDatasetSource` via ``datasets.load_dataset`` (``image_column`` default ``image``)

    ``caption_column`` defaults to ``text``, or ``caption`` when there is no ``text``.
    """
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, channels=channels)
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError("empty data spec: give a folder, a .tar shard pattern or a Hugging Face dataset name")
    if _is_webdataset_spec(text):
        return WebDatasetSource(
            text, transform, image_key=image_column, caption_key=caption_column, seed=0 if seed is None else seed
        )
    path = Path(text).expanduser()
    if path.is_file():
        raise ValueError(f"{path} is a file but not a .tar shard; give a folder, a .tar shard or a dataset name")
    if path.is_dir():
        return _build_from_folder(path, transform, image_column, caption_column, split, seed)
    if not _HUB_ID.match(text):
        raise ValueError(f"no such file or directory: {path.resolve()}")
    try:
        _import_datasets()
    except ValueError:
        # Most likely a mistyped local path; say so before suggesting an install.
        raise ValueError(
            f"no such file or directory: {path.resolve()} (to use it as a Hugging Face Hub name: pip install datasets)"
        ) from None
    return HFDatasetSource(
        text, transform, image_column=image_column or "image", caption_column=caption_column, split=split, seed=seed
    )


def _is_webdataset_spec(text: str) -> bool:
    if text.startswith("pipe:") or "::" in text:
        return True
    if re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", text):
        return True
    return text.lower().split("?")[0].endswith((".tar", ".tar.gz", ".tgz"))


def _build_from_folder(
    path: Path,
    transform: ImageTransform,
    image_column: str | None,
    caption_column: str | None,
    split: str,
    seed: int | None,
) -> ImageFolderSource | HFDatasetSource:
    folder_kwargs = {"caption_column": caption_column, "image_column": image_column or "file_name", "seed": seed}
    if (path / METADATA_FILE).is_file():
        return ImageFolderSource(path, transform, **folder_kwargs)
    if (path / split / METADATA_FILE).is_file():
        return ImageFolderSource(path / split, transform, **folder_kwargs)
    hf_kwargs = {"image_column": image_column or "image", "caption_column": caption_column, "split": split}
    if _is_saved_dataset(path) or _has_data_files(path):
        return HFDatasetSource(path, transform, seed=seed, **hf_kwargs)
    # Neither layout: let ImageFolderSource explain the expected one.
    return ImageFolderSource(path, transform, **folder_kwargs)


def _has_data_files(path: Path) -> bool:
    suffixes = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}
    return any(item.suffix.lower() in suffixes for item in path.rglob("*"))
