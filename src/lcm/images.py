"""Image grids: tensors in [−1, 1] → PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["make_grid", "save_grid", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [−1, 1] → ``[B, H, W, C]`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow, scale=scale).save(path)
    return path
