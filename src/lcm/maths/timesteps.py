"""Discrete timestep lists: the skipping-step grid of LCD, its training pairs, and the samplers' schedules.

Every list here reproduces the installed diffusers scheduler's ``set_timesteps`` (tested for parity), so that a
model trained or sampled here sees exactly the timesteps it would see in diffusers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lcm.maths.schedule import NoiseSchedule

__all__ = [
    "SkippingGrid",
    "ddim_timesteps",
    "dpm_solver_timesteps",
    "lcm_timesteps",
]


class SkippingGrid:
    """The skipping-step grid of LCD (Luo et al. 2023 §4.3): ``N`` solver timesteps, skip ``k = T // N``.

    ``t_n ∈ {k−1, 2k−1, …, N·k−1}``; a training sample draws ``t_{n+k}`` from the grid and sets
    ``t_n = max(t_{n+k} − k, 0)``.
    """

    def __init__(self, num_solver_steps: int = 50, num_train_timesteps: int = 1000):
        if not 1 <= num_solver_steps <= num_train_timesteps:
            raise ValueError(
                f"the number of solver steps N must lie in [1, {num_train_timesteps}], got {num_solver_steps}"
            )
        self.num_solver_steps = num_solver_steps
        self.k = num_train_timesteps // num_solver_steps
        self.timesteps = torch.arange(1, num_solver_steps + 1, dtype=torch.long) * self.k - 1  # (N,) ascending

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` pairs (t_{n+k}, t_n), each ``[B]`` long, uniformly over the grid."""
        index = torch.randint(0, self.num_solver_steps, (batch_size,), generator=generator)
        start = self.timesteps[index]
        return start, (start - self.k).clamp(min=0)


def lcm_timesteps(
    num_steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000, strength: float = 1.0
) -> torch.Tensor:
    """``LCMScheduler.set_timesteps``: ``num_steps`` evenly spaced indices into the reversed skipping grid.

    4 steps with the defaults → 999, 759, 499, 259.
    """
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"original_inference_steps must lie in [1, {num_train_timesteps}]")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, int(original_inference_steps * strength) + 1) * k - 1)[::-1]
    if not 1 <= num_steps <= len(origin):
        raise ValueError(f"the number of LCM steps must lie in [1, {len(origin)}], got {num_steps}")
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[indices].copy()).long()


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"the number of sampling steps must lie in [1, {num_train_timesteps}], got {num_steps}")


def ddim_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, timestep_spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """``DDIMScheduler.set_timesteps`` for the three spacings diffusers knows (descending, ``[N]`` long)."""
    _check_steps(num_steps, num_train_timesteps)
    if timestep_spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    elif timestep_spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}")
    return torch.from_numpy(ts.astype(np.int64).copy())


def dpm_solver_timesteps(
    num_steps: int,
    schedule: NoiseSchedule,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    lambda_min_clipped: float = -math.inf,
) -> torch.Tensor:
    """``DPMSolverMultistepScheduler.set_timesteps`` (no Karras/Lu/exponential sigmas): ``num_steps + 1`` points
    spaced over the un-clipped range, the last (t = 0 side) dropped."""
    num_train = schedule.num_train_timesteps
    _check_steps(num_steps, num_train)
    lambdas = schedule.lambda_(torch.arange(num_train))
    clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor(lambda_min_clipped, dtype=torch.float64)))
    last = num_train - clipped
    if timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif timestep_spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.arange(last, 0, -num_train / num_steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}")
    return torch.from_numpy(ts.astype(np.int64).copy())
