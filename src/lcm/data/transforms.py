"""Image decoding and the training transform: any PIL image → ``[C, H, W]`` float32 in [-1, 1]."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_ERRORS", "IMAGE_EXTENSIONS", "ImageTransform", "open_image", "to_mode"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What PIL (and the streams under it) raise for a corrupt, truncated or exotic image.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


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
        except IMAGE_ERRORS:
            pass  # a malformed EXIF block should not cost the image: keep it unrotated
        return image
    except IMAGE_ERRORS:
        return None
