"""Local folders of images: captioned by ``metadata.jsonl`` (Hugging Face ``imagefolder``) or plain, uncaptioned."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lcm.data.base import (
    INVALID_METADATA,
    MISSING_IMAGE_FILE,
    OUTSIDE_FOLDER,
    MapSource,
    Sample,
    check_caption,
    resolve_caption_column,
)
from lcm.data.transforms import IMAGE_EXTENSIONS, ImageTransform

__all__ = ["METADATA_FILE", "ImageFolderSource", "PlainImageFolder", "has_image_files"]

METADATA_FILE = "metadata.jsonl"


class ImageFolderSource(MapSource):
    """Images under ``root`` (any depth) captioned by ``root/metadata.jsonl`` (Hugging Face ``imagefolder``).

    Each metadata line is a JSON object such as ``{"file_name": "cats/1.png", "text": "a cat"}``. Rows with a
    missing image file or a missing / empty caption are skipped when the source is built; unreadable images when
    they are loaded, where ``__getitem__`` returns ``None`` (see :func:`collate_skip_none`). Rows keep the order
    of the metadata file. With ``seed`` set, random crops, flips and caption choices depend only on
    ``(seed, epoch, index)``. A ``file_name`` that leads out of ``root`` (``../x.png``, ``/etc/hostname``) is
    skipped unless ``allow_outside``: a metadata file from elsewhere must not make the run read other files (links
    inside the folder are followed as usual).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: ImageTransform,
        *,
        caption_column: str | None = None,
        image_column: str = "file_name",
        seed: int | None = None,
        allow_outside: bool = False,
    ) -> None:
        super().__init__(transform, seed)
        self.root = Path(root).expanduser()
        self.allow_outside = allow_outside
        metadata = self._metadata_path(self.root)
        rows = self._read_metadata(metadata)
        if not rows:
            raise ValueError(f"{metadata} has no JSON object lines ({self.skipped.summary()})")
        self.caption_column = resolve_caption_column(
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
        with open(path, "rb") as fh:  # decoded line by line: one bad byte costs one line, not the whole file
            for line_number, raw in enumerate(fh, start=1):
                key = f"{METADATA_FILE}:{line_number}"
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                    if not line.strip():
                        continue
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
        caption, reason = check_caption(row.get(self.caption_column))
        if reason is not None:
            self.skipped.add(reason, file_name)
            return
        inside = os.path.normpath(self.root / file_name).startswith(os.path.normpath(self.root) + os.sep)
        if not (inside or self.allow_outside):
            self.skipped.add(OUTSIDE_FOLDER, file_name)
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


class PlainImageFolder(MapSource):
    """Every image file under ``root`` (any depth, sorted by path), each with the caption ``""``.

    For data that needs no captions, such as the reference images of FID. Unreadable images are found when they
    are loaded, where ``__getitem__`` returns ``None`` (see :func:`~lcm.data.base.collate_skip_none`).
    """

    def __init__(self, root: str | os.PathLike, transform: ImageTransform, *, seed: int | None = None) -> None:
        super().__init__(transform, seed)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        self._files = [path.relative_to(self.root) for path in sorted(self.root.rglob("*")) if _is_image_file(path)]
        if not self._files:
            raise ValueError(f"{self.root} has no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index`` (caption ``""``), or ``None`` if its image cannot be decoded (counted in ``.skipped``)."""
        name = self._files[index]
        return self._make_sample(self.root / name, "", name.as_posix(), index)


def has_image_files(root: Path) -> bool:
    """Whether any file under ``root`` has an image extension."""
    return any(_is_image_file(path) for path in root.rglob("*"))


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and path.is_file()
