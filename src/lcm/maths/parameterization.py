"""Prediction types and their conversions (docs/design.md §1).

With ``z_t = α_t x0 + σ_t ε`` (α² + σ² = 1):

- ε-prediction: ``x̂0 = (z_t − σ_t ε̂) / α_t``
- v-prediction (Salimans & Ho 2022): ``v = α_t ε − σ_t x0``, so ``x̂0 = α_t z_t − σ_t v̂`` and ``ε̂ = σ_t z_t + α_t v̂``
- sample-prediction: ``x̂0`` given, ``ε̂ = (z_t − α_t x̂0) / σ_t``
- flow (velocity) prediction, for a flow schedule (α_t = 1 − σ_t, :class:`lcm.maths.schedule.FlowSchedule`):
  ``v = ε − x0``, so ``x̂0 = z_t − σ_t v̂`` and ``ε̂ = z_t + α_t v̂`` (diffusers' ``sample − σ·model_output``)
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch

__all__ = ["Denoised", "PredictionType", "append_dims", "to_denoised", "to_model_output"]


class PredictionType(str, Enum):
    """What a network outputs; the values are diffusers' ``prediction_type`` strings."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"
    FLOW = "flow_prediction"  # velocity ε − x0 of a rectified flow (diffusers' FlowMatch schedulers' models)

    @classmethod
    def parse(cls, value: str | PredictionType) -> PredictionType:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown prediction_type {value!r}; expected one of {choices}") from None


class Denoised(NamedTuple):
    """A model's estimate at (z_t, t) in both forms the solvers use."""

    x0: torch.Tensor  # (B, C, H, W) data estimate
    eps: torch.Tensor  # (B, C, H, W) noise estimate


def append_dims(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Cast a per-sample coefficient ``[B]`` (often float64) to ``like``'s dtype and shape it ``[B, 1, …, 1]``.

    A host float (one coefficient for the whole batch) is returned as it is: it multiplies in ``like``'s dtype.
    """
    if isinstance(coef, float):
        return coef
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def to_denoised(
    output: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: PredictionType,
) -> Denoised:
    """Convert a network output at ``z_t`` (α_t, σ_t given per sample, ``[B]``) into (x̂0, ε̂)."""
    a, s = append_dims(alpha, z), append_dims(sigma, z)
    if prediction_type is PredictionType.EPSILON:
        return Denoised((z - s * output) / a, output)
    if prediction_type is PredictionType.V_PREDICTION:
        return Denoised(a * z - s * output, s * z + a * output)
    if prediction_type is PredictionType.SAMPLE:
        return Denoised(output, (z - a * output) / s)
    if prediction_type is PredictionType.FLOW:
        return Denoised(z - s * output, z + a * output)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def to_model_output(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """The output a network of ``prediction_type`` should give for the pair (x0, ε): the training target."""
    a, s = append_dims(alpha, x0), append_dims(sigma, x0)
    if prediction_type is PredictionType.EPSILON:
        return eps
    if prediction_type is PredictionType.V_PREDICTION:
        return a * eps - s * x0
    if prediction_type is PredictionType.SAMPLE:
        return x0
    if prediction_type is PredictionType.FLOW:
        return eps - x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")
