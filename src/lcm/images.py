"""Images in and out: tensors in [−1, 1] ↔ PNG files, single images with text metadata, and labelled grids."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "decode_image_bytes",
    "image_to_tensor",
    "labelled_grid",
    "load_image",
    "make_grid",
    "save_grid",
    "save_image",
    "save_labelled_grid",
    "to_uint8",
]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [−1, 1] → ``[B, H, W, C]`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(arr: np.ndarray) -> Image.Image:
    """``[H, W, C]`` uint8 → a greyscale (C = 1) or RGB image."""
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[..., H, W, C]`` by an integer factor (each pixel becomes scale × scale)."""
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    return arr if scale == 1 else arr.repeat(scale, axis=-3).repeat(scale, axis=-2)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile ``[B, C, H, W]`` images row by row, ``nrow`` per row, with ``pad`` pixels of grey between them."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
    image = _pil(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    scale: int = 1,
    rows: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> Path:
    """Write a grid PNG: :func:`labelled_grid` when ``rows`` and ``columns`` label it (then ``nrow`` is
    ``len(columns)``), else the plain :func:`make_grid`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if (rows is None) != (columns is None):
        raise ValueError("a labelled grid needs both row and column labels")
    if rows is not None:
        labelled_grid(images, rows, columns, scale=scale).save(path)
    else:
        make_grid(images, nrow, scale=scale).save(path)
    return path


# --- single images -----------------------------------------------------------------------------------------------
def save_image(
    image: torch.Tensor, path: str | Path, scale: int = 1, metadata: Mapping[str, object] | None = None
) -> Path:
    """One ``[C, H, W]`` image in [−1, 1] as a PNG of exactly ``(H·scale) × (W·scale)`` pixels, no frame.

    ``metadata`` is written as PNG text chunks (``tEXt``, or ``iTXt`` for non-Latin-1 text), one per key, values
    as ``str``; keys whose value is None are left out. PIL reads them back as ``Image.open(path).text``.
    """
    if image.ndim != 3:
        raise ValueError(f"save_image takes one [C, H, W] image, got shape {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        if value is None:
            continue
        if _latin1(str(value)):
            info.add_text(key, str(value))
        else:
            info.add_itxt(key, str(value))
    _pil(_upscale(to_uint8(image[None])[0], scale)).save(path, pnginfo=info)
    return path


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def image_to_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A PIL image → ``[1, C, H, W]`` float32 in [−1, 1], greyscale (C = 1) or RGB.

    The arithmetic of diffusers' ``VaeImageProcessor.preprocess`` (``x / 255`` in float32, then ``2x − 1``), so a
    pipeline given the same image starts from the same tensor.
    """
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, got {channels}")
    image = image.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(image).astype(np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return 2.0 * torch.from_numpy(arr.transpose(2, 0, 1).copy())[None] - 1.0


class ImageTooLarge(ValueError):
    """An image whose side exceeds the bound it was read with."""


def decode_image_bytes(
    data: bytes,
    channels: int,
    size: tuple[int, int] | None = None,
    *,
    formats: Sequence[str] | None = None,
    max_side: int | None = None,
) -> torch.Tensor:
    """The one way an image enters the project (``lcm sample --image``, uploads to ``lcm serve``): bytes →
    ``[1, C, H, W]`` in [−1, 1], resized to ``size = (height, width)``.

    EXIF orientation is applied (as ``diffusers.utils.load_image``); resizing is Lanczos, the resampling of
    ``VaeImageProcessor``; ``formats`` limits the decoders tried (None: every Pillow format). A side above
    ``max_side`` raises :class:`ImageTooLarge` before the pixels are decoded; anything a decoder raises on a damaged
    file becomes one ``ValueError``.
    """
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            if max_side is not None and max(img.size) > max_side:
                raise ImageTooLarge(f"image is {img.width}x{img.height}; at most {max_side} pixels a side")
            img = ImageOps.exif_transpose(img)
            img.load()
    except ImageTooLarge:
        raise
    except Exception as err:  # decoders meeting damaged files raise many kinds (OSError, SyntaxError, struct.error)
        raise ValueError(f"not a readable image ({type(err).__name__})") from None
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").resize(
            (size[1], size[0]), Image.LANCZOS
        )
    return image_to_tensor(img, channels)


def load_image(
    path: str | Path, channels: int, size: tuple[int, int] | None = None, flag: str = "--image"
) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, …) → ``[1, C, H, W]`` in [−1, 1] (:func:`decode_image_bytes`); a missing
    or unreadable file is a one-line ValueError naming it (as ``flag``)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    try:
        return decode_image_bytes(data, channels, size)
    except ValueError as err:
        raise ValueError(f"{flag} {path}: {err}") from None


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An inpainting mask file → ``[1, 1, H, W]`` in [0, 1] (white = repaint), read as greyscale like an image
    (``x / 255``, Lanczos to ``size`` when it differs: give a mask of the output size to keep its edges exact)."""
    return (load_image(path, 1, size, "--mask") + 1.0) / 2.0


# --- labelled grids ------------------------------------------------------------------------------------------------
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a longer word is cut between letters)."""
    lines: list[str] = []
    for word in text.split():
        while _text_width(word, font) > width and len(word) > 1:
            cut = max(k for k in range(1, len(word)) if _text_width(word[:k], font) <= width or k == 1)
            if lines and _text_width(f"{lines[-1]} {word[:cut]}", font) <= width:
                lines[-1] = f"{lines[-1]} {word[:cut]}"
            else:
                lines.append(word[:cut])
            word = word[cut:]
        if lines and _text_width(f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(
    images: torch.Tensor,
    rows: Sequence[str],
    columns: Sequence[str],
    scale: int = 1,
    pad: int = 2,
    max_row_label_width: int = 240,
) -> Image.Image:
    """``[R·K, C, H, W]`` images (row-major: image ``r·K + k`` is row r, column k) on a white sheet, each row
    labelled on its left with ``rows[r]`` and each column on top with ``columns[k]``, in PIL's default font.

    Images are upscaled ``scale`` times (nearest neighbour) and separated by ``pad`` pixels; labels wrap to the
    column width (row labels to ``max_row_label_width``).
    """
    arr = _upscale(to_uint8(images), scale)
    n_rows, n_cols = len(rows), len(columns)
    if n_rows * n_cols != arr.shape[0]:
        raise ValueError(f"{arr.shape[0]} images do not fill {n_rows} rows x {n_cols} columns")
    _, h, w, c = arr.shape
    font = _font()
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_h = ascent + descent + 1
    col_lines = [_wrap(str(t), font, w) for t in columns]
    row_width = max([_text_width(str(t), font) for t in rows] + [1])
    row_width = min(row_width, max_row_label_width)
    row_lines = [_wrap(str(t), font, row_width) for t in rows]
    label_w = max(_text_width(line, font) for lines in row_lines for line in lines) + 2 * pad
    header_h = max(len(lines) for lines in col_lines) * line_h + 2 * pad
    row_h = max(h, max(len(lines) for lines in row_lines) * line_h)
    width = label_w + n_cols * (w + pad) + pad
    height = header_h + n_rows * (row_h + pad) + pad
    sheet = np.full((height, width, c), 255, dtype=np.uint8)
    for i in range(arr.shape[0]):
        r, k = divmod(i, n_cols)
        top, left = header_h + r * (row_h + pad), label_w + k * (w + pad)
        sheet[top : top + h, left : left + w] = arr[i]
    image = _pil(sheet)
    draw = ImageDraw.Draw(image)
    ink = 0 if c == 1 else (0, 0, 0)
    for k, lines in enumerate(col_lines):
        x0 = label_w + k * (w + pad)
        y = header_h - pad - len(lines) * line_h
        for line in lines:
            draw.text((x0 + (w - _text_width(line, font)) // 2, y), line, fill=ink, font=font)
            y += line_h
    for r, lines in enumerate(row_lines):
        y = header_h + r * (row_h + pad) + (row_h - len(lines) * line_h) // 2
        for line in lines:
            draw.text((pad, y), line, fill=ink, font=font)
            y += line_h
    return image


def save_labelled_grid(
    images: torch.Tensor, path: str | Path, rows: Sequence[str], columns: Sequence[str], scale: int = 1
) -> Path:
    """:func:`labelled_grid` written to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, rows, columns, scale=scale).save(path)
    return path
