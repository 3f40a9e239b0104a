"""The FID Inception-v3: the 2015-12-05 TensorFlow graph every published FID is computed with, in PyTorch.

This is the network torchmetrics' ``FrechetInceptionDistance`` runs (through torch-fidelity): its TensorFlow-specific
quirks (average pools that ignore padding, a max pool in the last block, TF1 bilinear resizing, ``(x − 128) / 128``
input scaling) decide the FID value, so they are kept exactly. Parameter names match torch-fidelity's weights file
``weights-inception-2015-12-05-6726825d.pth``, which loads as it is; torchvision is not needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["INCEPTION_URL", "FIDInception", "load_fid_inception", "resize_bilinear_tf1"]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299


def _tf1_matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) weights of TensorFlow 1's bilinear resize (align_corners=False, no half-pixel centres):
    output i samples the input at ``i · n_in / n_out``, between its floor and the next pixel (clamped at the edge)."""
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - lo.float()).to(dtype)
    m = torch.zeros(n_out, n_in, dtype=dtype)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` like TensorFlow 1's ``resize_bilinear`` (separable: rows, then columns)."""
    rows = _tf1_matrix(x.shape[-2], size[0], x.dtype).to(x.device)
    cols = _tf1_matrix(x.shape[-1], size[1], x.dtype).to(x.device)
    return rows @ x @ cols.T


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TensorFlow averages over the valid pixels only
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x):  # the graph's last block pools with max where the paper says average
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max_pool_stride2(x):
    return F.max_pool2d(x, 3, stride=2)


class Mixed(nn.Module):
    """An Inception block: parallel branches concatenated along channels.

    ``convs`` maps a parameter name to ``(c_in, c_out, kernel, stride, padding)``; each branch of ``branches`` is a
    sequence of steps, a step being a conv name, a pooling function, or a tuple of conv names applied side by side
    and concatenated (the split 1×3 / 3×1 ends of the last blocks).
    """

    def __init__(self, convs: dict, branches: list[list]):
        super().__init__()
        for name, (c_in, c_out, kernel, stride, padding) in convs.items():
            self.add_module(name, BasicConv2d(c_in, c_out, kernel, stride, padding))
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, str):
                    y = getattr(self, step)(y)
                elif isinstance(step, tuple):
                    y = torch.cat([getattr(self, name)(y) for name in step], 1)
                else:
                    y = step(y)
            outputs.append(y)
        return torch.cat(outputs, 1)


def _block_a(c_in: int, pool_features: int) -> Mixed:
    return Mixed(
        {
            "branch1x1": (c_in, 64, 1, 1, 0),
            "branch5x5_1": (c_in, 48, 1, 1, 0),
            "branch5x5_2": (48, 64, 5, 1, 2),
            "branch3x3dbl_1": (c_in, 64, 1, 1, 0),
            "branch3x3dbl_2": (64, 96, 3, 1, 1),
            "branch3x3dbl_3": (96, 96, 3, 1, 1),
            "branch_pool": (c_in, pool_features, 1, 1, 0),
        },
        [
            ["branch1x1"],
            ["branch5x5_1", "branch5x5_2"],
            ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
            [_avg_pool, "branch_pool"],
        ],
    )


def _block_b(c_in: int) -> Mixed:
    return Mixed(
        {
            "branch3x3": (c_in, 384, 3, 2, 0),
            "branch3x3dbl_1": (c_in, 64, 1, 1, 0),
            "branch3x3dbl_2": (64, 96, 3, 1, 1),
            "branch3x3dbl_3": (96, 96, 3, 2, 0),
        },
        [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], [_max_pool_stride2]],
    )


def _block_c(c_in: int, c7: int) -> Mixed:
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # (kernel, stride, padding) of the factorised 7×7
    return Mixed(
        {
            "branch1x1": (c_in, 192, 1, 1, 0),
            "branch7x7_1": (c_in, c7, 1, 1, 0),
            "branch7x7_2": (c7, c7, *row),
            "branch7x7_3": (c7, 192, *col),
            "branch7x7dbl_1": (c_in, c7, 1, 1, 0),
            "branch7x7dbl_2": (c7, c7, *col),
            "branch7x7dbl_3": (c7, c7, *row),
            "branch7x7dbl_4": (c7, c7, *col),
            "branch7x7dbl_5": (c7, 192, *row),
            "branch_pool": (c_in, 192, 1, 1, 0),
        },
        [
            ["branch1x1"],
            ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
            ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"],
            [_avg_pool, "branch_pool"],
        ],
    )


def _block_d(c_in: int) -> Mixed:
    return Mixed(
        {
            "branch3x3_1": (c_in, 192, 1, 1, 0),
            "branch3x3_2": (192, 320, 3, 2, 0),
            "branch7x7x3_1": (c_in, 192, 1, 1, 0),
            "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
            "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
            "branch7x7x3_4": (192, 192, 3, 2, 0),
        },
        [
            ["branch3x3_1", "branch3x3_2"],
            ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
            [_max_pool_stride2],
        ],
    )


def _block_e(c_in: int, pool) -> Mixed:
    row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    return Mixed(
        {
            "branch1x1": (c_in, 320, 1, 1, 0),
            "branch3x3_1": (c_in, 384, 1, 1, 0),
            "branch3x3_2a": (384, 384, *row),
            "branch3x3_2b": (384, 384, *col),
            "branch3x3dbl_1": (c_in, 448, 1, 1, 0),
            "branch3x3dbl_2": (448, 384, 3, 1, 1),
            "branch3x3dbl_3a": (384, 384, *row),
            "branch3x3dbl_3b": (384, 384, *col),
            "branch_pool": (c_in, 192, 1, 1, 0),
        },
        [
            ["branch1x1"],
            ["branch3x3_1", ("branch3x3_2a", "branch3x3_2b")],
            ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")],
            [pool, "branch_pool"],
        ],
    )


class FIDInception(nn.Module):
    """uint8 RGB images ``[B, 3, H, W]`` (any size) → the 2048-d pool features FID and KID are computed in."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        self.Mixed_6a = _block_b(288)
        self.Mixed_6b = _block_c(768, 128)
        self.Mixed_6c = _block_c(768, 160)
        self.Mixed_6d = _block_c(768, 160)
        self.Mixed_6e = _block_c(768, 192)
        self.Mixed_7a = _block_d(768)
        self.Mixed_7b = _block_e(1280, _avg_pool)
        self.Mixed_7c = _block_e(2048, _max_pool)
        self.fc = nn.Linear(2048, 1008)  # the graph's logits: unused by FID, kept so the weights file loads strictly

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the FID Inception takes uint8 images [B, 3, H, W], got {images.dtype} {images.shape}")
        x = resize_bilinear_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_fid_inception(weights: str | os.PathLike | None = None) -> FIDInception:
    """The FID Inception with its weights from ``weights`` (a .pth or .safetensors file), else downloaded once from
    torch-fidelity's release into the torch hub cache. Raises ValueError with what to do when neither works."""
    model = FIDInception()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"--inception-weights {path}: no such file")
        state = _read_state_dict(path)
    else:
        try:
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", progress=True)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same instruction
            raise ValueError(
                f"FID/KID need the FID Inception-v3 weights and downloading them failed ({type(err).__name__}: "
                f"{err}); download {INCEPTION_URL} and pass it with --inception-weights PATH"
            ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the Inception weights do not fit the FID Inception-v3 ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use {INCEPTION_URL}"
        )
    return model.eval().requires_grad_(False)
