"""Fashion-MNIST (Xiao et al. 2017; MIT licence), the embedded default's data (docs/design.md §5).

Files are looked for, in order: ``--data-dir``; the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); a previous download in the cache; a download of the canonical files.
Each file's *decompressed* content is checked against its SHA-256, so any mirror or recompression is accepted and a
truncated or altered file is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "FashionMNIST", "IDXError", "load_fashion_mnist", "read_idx"]

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# File stem and SHA-256 of the decompressed IDX payload.
FILES = {
    ("train", "images"): (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    ("train", "labels"): (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    ("test", "images"): (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    ("test", "labels"): (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


class IDXError(ValueError):
    """A missing, truncated or corrupt IDX file."""


def read_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format) of unsigned bytes into an array, checking its header and length."""
    if len(raw) < 4:
        raise IDXError(f"{source}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise IDXError(f"{source}: not an unsigned-byte IDX file (bad magic number)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{source}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IDXError(f"{source}: {len(raw)} bytes where the header promises {expected} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_payload(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            data = fh.read()
        return gzip.decompress(data) if head == b"\x1f\x8b" else data
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IDXError(f"{path}: cannot be read ({err}); the file is truncated or corrupt") from err


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("LCM_CACHE", Path.home() / ".cache" / "lcm")) / "fashion-mnist"


def _download(stem: str, sha256: str, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + stem + ".gz", timeout=30) as response:
                data = response.read()
            payload = gzip.decompress(data)
        except Exception as err:  # network errors of every kind: try the next mirror
            errors.append(f"{mirror}: {err}")
            continue
        if hashlib.sha256(payload).hexdigest() != sha256:
            errors.append(f"{mirror}: checksum mismatch")
            continue
        tmp = dest_dir / (stem + ".gz.part")
        tmp.write_bytes(data)
        tmp.replace(dest_dir / (stem + ".gz"))  # atomic: a crash never leaves a half file under the real name
        return dest_dir / (stem + ".gz")
    raise IDXError("; ".join(errors))


def _locate(split: str, kind: str, data_dir: Path | None, download: bool) -> bytes:
    stem, sha256 = FILES[(split, kind)]
    places = [d for d in (data_dir, DEBIAN_DIR, _cache_dir()) if d is not None]
    if data_dir is not None:
        places = [data_dir]  # an explicit directory is the only place looked at
    for directory in places:
        path = _find(directory, stem)
        if path is not None:
            payload = _read_payload(path)
            if hashlib.sha256(payload).hexdigest() != sha256:
                read_idx(payload, str(path))  # a length/header problem gets the more precise message
                raise IDXError(f"{path}: content does not match Fashion-MNIST's checksum (corrupt or another file)")
            return payload
    if download and data_dir is None:
        try:
            return _read_payload(_download(stem, sha256, _cache_dir()))
        except IDXError as err:
            reason = f" Download failed: {err}"
    else:
        reason = ""
    raise IDXError(
        f"Fashion-MNIST file {stem}(.gz) not found. Give --data-dir DIR with the four IDX files, or install the "
        f"Debian package (apt-get install dataset-fashion-mnist, into {DEBIAN_DIR}), or go online so it can be "
        f"downloaded into {_cache_dir()}.{reason}"
    )


@dataclass(frozen=True)
class FashionMNIST:
    """One split as tensors: images ``[N, 1, 32, 32]`` float32 in [−1, 1] (28² zero-padded by 2), labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None, download: bool = True) -> FashionMNIST:
    """Load the published train (60k) or test (10k) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else None
    images = read_idx(_locate(split, "images", data_dir, download), f"{split} images")
    labels = read_idx(_locate(split, "labels", data_dir, download), f"{split} labels")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IDXError(f"{split}: images {images.shape} and labels {labels.shape} do not pair up")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)[:, None]  # background is black: pad with −1
    return FashionMNIST(x, torch.from_numpy(labels.astype(np.int64)))


class FashionCaptionDataset(torch.utils.data.Dataset):
    """Fashion-MNIST as an image–caption dataset: ``{"pixel_values": [1, 32, 32], "caption": str}``.

    Each image gets one caption of its class, fixed by its index (a multiplicative hash spreads the class's
    templates × synonyms evenly over its images), so an epoch is reproducible whatever the data order.
    """

    def __init__(self, split: str = "train", data_dir: str | Path | None = None, classes: list[int] | None = None):
        from lcm.data.captions import CaptionSet

        data = load_fashion_mnist(split, data_dir)
        keep = torch.ones(len(data), dtype=torch.bool)
        if classes is not None:
            if not classes or not all(0 <= c < len(CLASS_NAMES) for c in classes):
                raise ValueError(f"classes must be a non-empty subset of 0..{len(CLASS_NAMES) - 1}, got {classes}")
            keep = torch.isin(data.labels, torch.tensor(classes))
        self.images, self.labels = data.images[keep], data.labels[keep]
        self.captions = CaptionSet()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        options = self.captions.by_class[label]
        caption = self.captions.captions[options[(i * 2654435761) % len(options)]]
        return {"pixel_values": self.images[i], "caption": caption}
