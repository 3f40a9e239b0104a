"""Exponential moving average of parameters, matched by name (never by position)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update"]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``θ⁻ ← μ θ⁻ + (1 − μ) θ`` for every parameter of ``target``, looked up by name in ``source``.

    Buffers are copied. ``decay = 0`` copies ``source``; ``decay = 1`` leaves ``target`` unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    src = dict(source.named_parameters())
    tgt = dict(target.named_parameters())
    if src.keys() != tgt.keys():
        missing, extra = sorted(tgt.keys() - src.keys()), sorted(src.keys() - tgt.keys())
        raise ValueError(f"EMA target and source differ: only in target {missing[:3]}, only in source {extra[:3]}")
    targets = list(tgt.values())
    sources = [src[name].to(p.dtype) for name, p in tgt.items()]
    torch._foreach_lerp_(targets, sources, 1.0 - decay)  # one fused kernel launch per group, not one per tensor
    src_buffers = dict(source.named_buffers())
    for name, b in target.named_buffers():
        b.copy_(src_buffers[name])
