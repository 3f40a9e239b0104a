"""Classifier-free guidance in the LCM convention and the guidance-scale embedding (docs/design.md §2).

The paper writes guidance as ``ε̃ = ε(z, c) + w·(ε(z, c) − ε(z, ∅))`` (Eq. 13, Luo et al. 2023); diffusers'
pipelines write ``ε(z, ∅) + g·(ε(z, c) − ε(z, ∅))``. They are the same for ``g = w + 1``: this module is the one place
that conversion is written.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lcm.maths.parameterization import append_dims

__all__ = [
    "EMBEDDED_DEFAULT_W",
    "SD_DEFAULT_W",
    "W_EMBEDDING_DIM",
    "cached_w_embedding",
    "cfg_combine",
    "default_w",
    "guidance_scale_from_w",
    "w_embedding",
    "w_from_guidance_scale",
]

W_EMBEDDING_DIM = 256  # the time_cond_proj_dim a new full student gets
EMBEDDED_DEFAULT_W = 3.0  # the embedded Fashion-MNIST teacher's best w (its model card's sweep)
SD_DEFAULT_W = 6.5  # Stable Diffusion's usual guidance: diffusers' guidance_scale 7.5


def default_w(distilled_range: tuple[float, float] | None, embedded: bool) -> float:
    """The default guidance weight, everywhere (sampling, validation grids, LCF, evaluation).

    An LCM samples best inside the range of w it was distilled on: the middle of ``distilled_range``. A model without
    one (a teacher, a LoRA without a w input) uses its family's usual value.
    """
    if distilled_range is not None:
        low, high = distilled_range
        return (float(low) + float(high)) / 2
    return EMBEDDED_DEFAULT_W if embedded else SD_DEFAULT_W


def guidance_scale_from_w(w: float) -> float:
    """diffusers' pipeline ``guidance_scale`` for the LCM guidance weight ``w``."""
    return w + 1.0


def w_from_guidance_scale(guidance_scale: float) -> float:
    """LCM guidance weight ``w`` for diffusers' pipeline ``guidance_scale``."""
    return guidance_scale - 1.0


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """``cond + w·(cond − uncond)``, with ``w`` a scalar or per-sample ``[B]``.

    Linear in the prediction, so it applies unchanged to ε, v or x0 outputs taken at the same (z, t).
    """
    w = torch.as_tensor(w, dtype=torch.float64)
    w = append_dims(w, cond) if w.ndim == 1 else w.to(device=cond.device, dtype=cond.dtype)
    return cond + w * (cond - uncond)


def w_embedding(w: torch.Tensor, dim: int = W_EMBEDDING_DIM, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of ``1000·w`` (VDM's), ``[B] → [B, dim]``: the student UNet's ``timestep_cond``.

    Identical to ``LatentConsistencyModelPipeline.get_guidance_scale_embedding(guidance_scale − 1)``.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D tensor of per-sample guidance weights, got shape {tuple(w.shape)}")
    half = dim // 2
    # Arguments reach 1000·w ≈ 1e4 rad: every op below is kept in the order and dtype diffusers uses, so the
    # embedding is bit-identical to the pipeline's rather than merely close.
    log_base = torch.log(torch.tensor(10000.0, dtype=dtype)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -log_base).to(w.device)
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def cached_w_embedding(w: torch.Tensor, dim: int = W_EMBEDDING_DIM) -> torch.Tensor:
    """:func:`w_embedding` of ``w`` (on the CPU), computed once per distinct weights and size: a sampler asks for
    the same embedding image after image. The tensor returned is shared: read it, never write to it."""
    return _w_embedding_of(tuple(w.tolist()), w.dtype, dim)


@lru_cache(maxsize=64)
def _w_embedding_of(w: tuple[float, ...], dtype: torch.dtype, dim: int) -> torch.Tensor:
    return w_embedding(torch.tensor(w, dtype=dtype), dim)
