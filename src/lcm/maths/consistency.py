"""The consistency parameterisation (Eq. 9, Luo et al. 2023; Song et al. 2023 §3).

``f(z, w, c, t) = c_skip(t)·z + c_out(t)·x̂0(z, w, c, t)`` with, for discrete t scaled by ``s`` (diffusers'
``timestep_scaling``, 10), ``c_skip = σ_d² / ((s·t)² + σ_d²)`` and ``c_out = s·t / √((s·t)² + σ_d²)``, σ_d = 0.5.
``c_skip(0) = 1`` and ``c_out(0) = 0``, so ``f(z, 0) = z``: the boundary condition holds by construction.
"""

from __future__ import annotations

import functools

import torch

from lcm.maths.parameterization import append_dims

__all__ = ["SIGMA_DATA", "TIMESTEP_SCALING", "boundary_scalings", "boundary_scalings_at", "consistency_function"]

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) for timesteps ``t`` ``[B]``, float64."""
    scaled = torch.as_tensor(t).to(torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


@functools.lru_cache(maxsize=4096)
def boundary_scalings_at(
    t: float, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[float, float]:
    """(c_skip, c_out) of one host-float timestep (the sampler's case), the same formula in float64, computed once
    per (t, σ_d, s)."""
    c_skip, c_out = boundary_scalings(torch.tensor([float(t)], dtype=torch.float64), sigma_data, timestep_scaling)
    return c_skip.item(), c_out.item()


def consistency_function(
    z: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor | float, c_out: torch.Tensor | float
) -> torch.Tensor:
    """``c_skip·z + c_out·x̂0`` for ``z, x0`` ``[B, C, H, W]``: the one place the consistency output is formed, for
    coefficients per sample ``[B]`` (:func:`boundary_scalings`, training), one host float or one 0-d tensor each
    (:func:`boundary_scalings_at`, sampling; a compiled step's tensor input)."""
    return append_dims(c_skip, z) * z + append_dims(c_out, x0) * x0
