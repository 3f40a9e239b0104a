"""Consistency distances d(a, b) (docs/design.md §2). Each returns per-sample values ``[B]``; the caller reduces."""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["LossType", "consistency_loss", "l2_loss", "pseudo_huber_loss"]


class LossType(str, Enum):
    L2 = "l2"
    HUBER = "huber"


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def l2_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in float32 at least."""
    return _per_sample_mean((a.float() - b.float()) ** 2)


def pseudo_huber_loss(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber ``√((a−b)² + c²) − c`` per element, averaged per sample (Song & Dhariwal 2023, Eq. 10).

    Behaves like ``(a−b)²/(2c)`` for ``|a−b| ≪ c`` and like ``|a−b| − c`` for ``|a−b| ≫ c``.
    """
    if c <= 0:
        raise ValueError(f"the pseudo-Huber constant c must be positive, got {c}")
    d2 = (a.float() - b.float()) ** 2
    # d²/(√(d² + c²) + c) equals √(d² + c²) − c without its cancellation for |d| ≪ c (float32 loses all digits).
    return _per_sample_mean(d2 / (torch.sqrt(d2 + c * c) + c))


def consistency_loss(a: torch.Tensor, b: torch.Tensor, loss: LossType, huber_c: float = 0.001) -> torch.Tensor:
    if loss is LossType.L2:
        return l2_loss(a, b)
    if loss is LossType.HUBER:
        return pseudo_huber_loss(a, b, huber_c)
    raise ValueError(f"unknown loss {loss!r}")
