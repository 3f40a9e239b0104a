"""The training loop's optimiser and learning-rate schedule: AdamW, fused where it can be, with per-group rate
multipliers, and a schedule counted in optimiser steps. Its settings are :class:`lcm.config.run.OptimConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lcm.config.run import OptimConfig

__all__ = ["cosine_floor", "make_lr_scheduler", "make_optimizer"]


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameter ``groups``; a group's ``lr_scale`` multiplies ``cfg.learning_rate`` (which must be set:
    :meth:`OptimConfig.resolved`)."""
    if cfg.learning_rate is None:
        raise ValueError("the learning rate is not set (OptimConfig.resolved fills in its default)")
    groups = [
        {**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": cfg.learning_rate * g.get("lr_scale", 1.0)}
        for g in groups
    ]
    params = [p for g in groups for p in g["params"]]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # The fused kernel (CPU and CUDA) updates every tensor in one pass: 6x faster than the for-each one on the
    # embedded student's 1.7 M parameters on a CPU, and it works with the fp16 gradient scaler.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def cosine_floor(warmup: int, total: int) -> Callable[[int], float]:
    """The "cosine_floor" schedule: linear warm-up to the full rate over ``warmup`` steps, then half a cosine down to
    10% of it at step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1

    return f


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A schedule over ``max_steps`` optimiser steps (Accelerate's would count micro-batches × processes)."""
    if cfg.lr_schedule == "cosine_floor":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_floor(cfg.lr_warmup_steps, max_steps))
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_schedule, optimizer, cfg.lr_warmup_steps, max_steps)
