"""How a ``--data`` string is read: :func:`parse_data_spec` says what it names, :func:`open_data` opens it.

- ``fashion-mnist`` or ``fashion-mnist:0,3,7`` → Fashion-MNIST with class captions, at its own 32×32×1
- ``.tar`` / ``.tar.gz`` / ``.tgz`` paths or URLs, brace patterns, ``pipe:`` commands → :class:`WebDatasetSource`
  (``image_column``: ``;``-separated image extensions; ``caption_column``: the caption extension or JSON field)
- a local folder with ``metadata.jsonl`` (or ``<split>/metadata.jsonl``) → :class:`ImageFolderSource`
  (``image_column``: the metadata key of the file name, default ``file_name``)
- a local folder written by ``datasets``' ``save_to_disk``, or holding data files → :class:`HFDatasetSource`
- a local folder of images only, when captions are not required → :class:`PlainImageFolder` (captions ``""``)
- a folder written by ``lcm cache`` (``lcm_cache.json``) → :class:`LatentCache` (VAE latents and text embeddings)
- a Hugging Face Hub name such as ``"lambdalabs/naruto-blip-captions"`` → :class:`HFDatasetSource`
  (``image_column`` default ``image``)

``caption_column`` defaults to ``text``, or ``caption`` when there is no ``text``. Every dataset yields
``{"pixel_values": FloatTensor [C, H, W] in [-1, 1], "caption": str}``. Bad data never stops training: missing or
empty captions are found when a source is opened, unreadable images when they are decoded, and every skip is
counted by reason in the source's ``.skipped``. Map-style sources return ``None`` for an unreadable image, so use
them with ``DataLoader(..., collate_fn=collate_skip_none)``, which drops those items::

    data = open_data("data/pokemon", resolution=512)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_skip_none)
    for batch in loader:
        if batch is None:  # every item of this batch was unreadable
            continue
        ...
    print(data.skipped.summary())

Counts are kept in the process that does the work: with ``num_workers=0`` ``.skipped`` is complete; with workers
each worker counts into its own copy, so the main process sees only what was found when opening plus, per batch,
``batch["num_skipped"]`` (the items :func:`collate_skip_none` dropped).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from torch.utils.data import Dataset

from lcm.data import hf
from lcm.data.base import collate_skip_none
from lcm.data.fashion_mnist import CLASS_NAMES, FashionCaptionDataset
from lcm.data.folder import METADATA_FILE, ImageFolderSource, PlainImageFolder, has_image_files
from lcm.data.hf import HFDatasetSource
from lcm.data.latent_cache import LatentCache, is_latent_cache
from lcm.data.transforms import ImageTransform
from lcm.data.webdataset import WebDatasetSource, is_remote, shard_path
from lcm.locations import is_hub_id

__all__ = ["DataKind", "DataSpec", "collate_skip_none", "open_data", "parse_data_spec"]

_CLASSES_HINT = f"classes must be comma-separated labels 0-{len(CLASS_NAMES) - 1}, e.g. fashion-mnist:0,3,7"


class DataKind(str, Enum):
    """What a data string names."""

    FASHION = "fashion-mnist"  # "fashion-mnist" or "fashion-mnist:0,3,7"
    WEBDATASET = "webdataset"  # .tar/.tar.gz/.tgz paths or URLs, brace patterns, pipe: commands
    FOLDER = "folder"  # a local directory: imagefolder, save_to_disk, data files or plain images
    LATENT_CACHE = "latent-cache"  # a folder written by lcm cache
    HUB = "hub"  # a Hugging Face datasets name


@dataclass(frozen=True)
class DataSpec:
    """A parsed data string: its kind, its location (``~`` expanded for local paths) and Fashion-MNIST classes."""

    kind: DataKind
    location: str
    classes: tuple[int, ...] | None = None


def parse_data_spec(text: str | os.PathLike) -> DataSpec:
    """What ``text`` names; ``ValueError`` for an empty string, a missing local path or a bad class list.

    Only the local file system is consulted: Hub names and URLs are checked when they are opened.
    """
    given = os.fspath(text).strip()
    if not given:
        raise ValueError("--data is empty: give fashion-mnist[:classes], a folder, .tar shards or a dataset name")
    if given == DataKind.FASHION.value or given.startswith(DataKind.FASHION.value + ":"):
        return DataSpec(DataKind.FASHION, DataKind.FASHION.value, _fashion_classes(given))
    if _is_webdataset_spec(given):
        return DataSpec(DataKind.WEBDATASET, _webdataset_location(given))
    path = Path(given).expanduser()
    if path.is_dir():
        return DataSpec(DataKind.LATENT_CACHE if is_latent_cache(path) else DataKind.FOLDER, str(path))
    if path.exists():
        raise ValueError(f"--data {given}: a file but not a .tar shard; give a folder, .tar shards or a dataset name")
    if is_hub_id(given):
        return DataSpec(DataKind.HUB, given)
    raise ValueError(f"--data {given}: no such file or directory")


def open_data(
    spec: str | DataSpec,
    *,
    resolution: int,
    channels: int = 3,
    image_column: str | None = None,
    caption_column: str | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    split: str = "train",
    seed: int | None = None,
    data_dir: Path | None = None,
    captions_required: bool = True,
    allow_outside: bool = False,
) -> Dataset:
    """The dataset ``spec`` names, yielding ``{"pixel_values", "caption"}`` samples (``None`` for a skipped one).

    Images are transformed with :class:`ImageTransform` (``resolution``, crop, flip, ``channels``); Fashion-MNIST
    keeps its own 32×32×1 and reads ``split`` ("train" / "test") from ``data_dir``. ``seed`` fixes random crops,
    flips and caption choices. ``captions_required=False`` also accepts a folder of images without metadata.
    ``allow_outside`` lets a folder's ``metadata.jsonl`` name files outside the folder (:class:`ImageFolderSource`).
    """
    if not isinstance(spec, DataSpec):
        spec = parse_data_spec(spec)
    if spec.kind is DataKind.FASHION:
        return FashionCaptionDataset(split, data_dir, None if spec.classes is None else list(spec.classes))
    if spec.kind is DataKind.LATENT_CACHE:
        if random_flip or not center_crop:
            raise ValueError(f"--data {spec.location} is a latent cache: random crops and flips cannot be cached")
        return LatentCache(spec.location)
    return build_source(
        spec,
        resolution=resolution,
        image_column=image_column,
        caption_column=caption_column,
        center_crop=center_crop,
        random_flip=random_flip,
        channels=channels,
        split=split,
        seed=seed,
        captions_required=captions_required,
        allow_outside=allow_outside,
    )


def build_source(
    spec: str | os.PathLike | DataSpec,
    *,
    resolution: int,
    image_column: str | None = None,
    caption_column: str | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    channels: int = 3,
    split: str = "train",
    seed: int | None = None,
    captions_required: bool = True,
    allow_outside: bool = False,
) -> ImageFolderSource | PlainImageFolder | HFDatasetSource | WebDatasetSource:
    """The image source ``spec`` names, any kind but Fashion-MNIST; the arguments are those of :func:`open_data`."""
    if not isinstance(spec, DataSpec):
        spec = parse_data_spec(spec)
    if spec.kind in (DataKind.FASHION, DataKind.LATENT_CACHE):
        raise ValueError(f"--data {spec.location}: not an image file source; open it with open_data")
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, channels=channels)
    if spec.kind is DataKind.WEBDATASET:
        seed = 0 if seed is None else seed
        return WebDatasetSource(spec.location, transform, image_key=image_column, caption_key=caption_column, seed=seed)
    if spec.kind is DataKind.FOLDER:
        return _open_folder(
            Path(spec.location), transform, image_column, caption_column, split, seed, captions_required, allow_outside
        )
    try:
        hf.import_datasets()
    except ValueError:
        # Most likely a mistyped local path; say so before suggesting an install.
        raise ValueError(
            f"--data {spec.location}: no such file or directory "
            "(to use it as a Hugging Face Hub name: pip install datasets)"
        ) from None
    return HFDatasetSource(
        spec.location,
        transform,
        image_column=image_column or "image",
        caption_column=caption_column,
        split=split,
        seed=seed,
    )


def _fashion_classes(text: str) -> tuple[int, ...] | None:
    if ":" not in text:
        return None
    try:
        classes = tuple(int(label) for label in text.split(":", 1)[1].split(","))
    except ValueError:
        raise ValueError(f"--data {text}: {_CLASSES_HINT}") from None
    if not classes or not all(0 <= label < len(CLASS_NAMES) for label in classes):
        raise ValueError(f"--data {text}: {_CLASSES_HINT}")
    return classes


def _is_webdataset_spec(text: str) -> bool:
    if text.startswith("pipe:") or "::" in text:
        return True
    if re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", text):
        return True
    return text.lower().split("?")[0].endswith((".tar", ".tar.gz", ".tgz"))


def _webdataset_location(text: str) -> str:
    if "::" in text or is_remote(text):
        return text
    location = os.path.expanduser(text)
    # A brace pattern is checked shard by shard when it is opened, with the count of missing ones.
    if "{" not in location and not shard_path(location).is_file():
        raise ValueError(f"--data {text}: no such file or directory")
    return location


def _open_folder(
    path: Path,
    transform: ImageTransform,
    image_column: str | None,
    caption_column: str | None,
    split: str,
    seed: int | None,
    captions_required: bool,
    allow_outside: bool = False,
) -> ImageFolderSource | PlainImageFolder | HFDatasetSource:
    folder_kwargs = {"caption_column": caption_column, "image_column": image_column or "file_name", "seed": seed}
    folder_kwargs["allow_outside"] = allow_outside
    if (path / METADATA_FILE).is_file():
        return ImageFolderSource(path, transform, **folder_kwargs)
    if (path / split / METADATA_FILE).is_file():
        return ImageFolderSource(path / split, transform, **folder_kwargs)
    hf_kwargs = {"image_column": image_column or "image", "caption_column": caption_column, "split": split}
    if hf.is_saved_dataset(path):
        return HFDatasetSource(path, transform, seed=seed, **hf_kwargs)
    if not captions_required and has_image_files(path):
        return PlainImageFolder(path, transform, seed=seed)
    if hf.has_data_files(path):
        return HFDatasetSource(path, transform, seed=seed, **hf_kwargs)
    if not captions_required:
        return PlainImageFolder(path, transform, seed=seed)  # explains that there are no images
    # Neither layout: let ImageFolderSource explain the expected one.
    return ImageFolderSource(path, transform, **folder_kwargs)
