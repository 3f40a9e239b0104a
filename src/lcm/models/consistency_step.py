"""One consistency step of a sampler as a module: what ``--compile on`` compiles on the CPU (:mod:`lcm.models.aot`)."""

from __future__ import annotations

from typing import Any

import torch

from lcm.maths.consistency import consistency_function
from lcm.maths.parameterization import to_denoised
from lcm.models.text import TextEmbeddings

__all__ = ["ConsistencyStep"]


class ConsistencyStep(torch.nn.Module):
    """One consistency step of a sampler, ``f(z, t) = c_skip z + c_out x̂0`` for a batch sharing one timestep.

    The coefficients arrive as a tensor ``[α_t, σ_t, c_skip, c_out]`` (:meth:`LatentDiffusion.step_coefficients`)
    rather than as numbers, so that one compiled graph of this module serves every timestep: ``--compile on`` on the
    CPU turns the UNet call and the boundary arithmetic into one package call (:mod:`lcm.models.aot`). Eagerly it
    computes exactly what the per-sample path computes, in the same order.
    """

    def __init__(self, model: Any, unet):  # a LatentDiffusion (which imports this module)
        super().__init__()
        self.unet = unet
        self._model = model  # not a submodule: the step owns nothing but the UNet it calls

    @property
    def config(self) -> dict:
        """What the graph depends on: the UNet's config and the model's (read by the compiled-package cache key)."""
        return {
            **dict(getattr(self.unet, "config", {}) or {}),
            "prediction_type": self._model.prediction_type.value,
            "vae_scale_factor": self._model.vae_scale_factor,
        }

    def forward(self, z, t, hidden_states, pooled, timestep_cond, coefficients):
        model = self._model
        out = model.unet_output(z, t, TextEmbeddings(hidden_states, pooled), timestep_cond).float()
        alpha, sigma, c_skip, c_out = coefficients.unbind()
        x0 = to_denoised(out, z, alpha, sigma, model.prediction_type).x0
        return consistency_function(z, x0, c_skip, c_out)

    def extra_repr(self) -> str:
        return f"prediction_type={self._model.prediction_type.value}"
