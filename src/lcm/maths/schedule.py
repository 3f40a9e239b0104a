"""Noise schedules: a discrete-time VP diffusion model's and a rectified flow's (docs/design.md §1, §15).

``z_t = α_t z_0 + σ_t ε`` with ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)`` and ``λ_t = log(α_t / σ_t)``, for integer
``t ∈ {0, …, T−1}``. Non-integer ``t`` (the midpoints of the 2nd-order solvers) is handled as DPM-Solver's discrete
``NoiseScheduleVP`` does: ``log α`` is interpolated piecewise-linearly over ``t``. All tables are float64; callers
cast the coefficients they finally multiply with; :meth:`NoiseSchedule.add_noise` is the one place the forward
process is written.

:class:`FlowSchedule` is a flow-matching teacher's (SD3, Flux): ``z_t = (1 − σ) z0 + σ ε`` with ``σ = t / T`` for
real ``t ∈ [0, T]`` (diffusers' flow models take the timestep ``1000·σ``). It answers the same questions (α_t, σ_t,
λ_t and its inverse, the forward process) through :class:`Schedule`, so every solver and sampler written in (α, σ)
serves both families: DDIM's ``α_t x̂0 + σ_t ε̂`` is exactly the flow's Euler step ``z + (σ_t − σ_s)·v``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["FlowSchedule", "NoiseSchedule", "Schedule", "betas_from_config", "schedule_from_config"]

MAX_TRAIN_TIMESTEPS = 100_000  # diffusion models train on 1,000; a table this long is still small


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that the last step has zero SNR."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """β_1..β_T (float64) for a diffusers scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``, …)."""
    num = int(config.get("num_train_timesteps", 1000))
    if not 2 <= num <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must lie in [2, {MAX_TRAIN_TIMESTEPS}], got {num}")
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        steps = torch.arange(num + 1, dtype=torch.float64) / num
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(
            f"beta_schedule {schedule!r} is not supported; use one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
            "or give trained_betas"
        )
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing; x is clamped to [xp[0], xp[-1]]."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class Schedule:
    """What every schedule answers: (α_t, σ_t) and λ_t for real timesteps ``t``, and the forward process on them.

    Subclasses give :meth:`alpha_sigma`, :meth:`lambda_` and :meth:`t_of_lambda` (float64, on ``t``'s device) and a
    ``_host`` dict for :meth:`alpha_sigma_at`.
    """

    num_train_timesteps: int
    final_alpha_cumprod: float  # ᾱ "below t = 0", where DDIM's (flow: Euler's) last step lands
    is_flow = False

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_sigma(t)[1]

    def alpha_sigma_to(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of a point a trajectory maps to: the clean end x0 itself, (1, 0), at t = 0."""
        return self.alpha_sigma(t)

    def alpha_sigma_at(self, t: float) -> tuple[float, float]:
        """(α_t, σ_t) of one timestep as host floats, computed once per value: a sampler's timesteps are shared by
        the whole batch, so its coefficients cost nothing per step (no small tensor ops, no device round trip)."""
        if t not in self._host:
            alpha, sigma = self.alpha_sigma(torch.tensor([float(t)], dtype=torch.float64))
            self._host[t] = (alpha.item(), sigma.item())
        return self._host[t]

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The forward process ``z_t = α_t z0 + σ_t ε`` at per-sample timesteps ``t`` ``[B]``, or at one host float
        ``t`` for the whole batch.

        α and σ are computed in float64, then cast to ``z0``'s dtype, so that every caller (training losses,
        samplers) noises with bit-identical coefficients: a Python float multiplies a tensor in the tensor's dtype.
        """
        if not isinstance(t, torch.Tensor):
            alpha, sigma = self.alpha_sigma_at(float(t))
            return alpha * z0 + sigma * noise
        alpha, sigma = self.alpha_sigma(t.to(z0.device))
        alpha = alpha.to(device=z0.device, dtype=z0.dtype).reshape(-1, *(1,) * (z0.ndim - 1))
        sigma = sigma.to(device=z0.device, dtype=z0.dtype).reshape(-1, *(1,) * (z0.ndim - 1))
        return alpha * z0 + sigma * noise


@dataclass(frozen=True, eq=False)
class NoiseSchedule(Schedule):
    """α_t, σ_t and λ_t of a VP schedule, from its cumulative product ᾱ_t (float64, shape [T])."""

    alphas_cumprod: torch.Tensor  # (T,) float64, ᾱ_t for t = 0..T-1
    final_alpha_cumprod: float = 1.0  # ᾱ "below t = 0", where DDIM's last step lands (diffusers' set_alpha_to_one)

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D table of at least two timesteps")
        if ac.dtype != torch.float64:
            object.__setattr__(self, "alphas_cumprod", ac.to(torch.float64))
        # log α_t = ½ log ᾱ_t, the quantity interpolated for non-integer t.
        object.__setattr__(self, "_log_alpha", 0.5 * torch.log(self.alphas_cumprod))
        object.__setattr__(self, "_tables_on", {})  # device → (grid, log α): tables live where the timesteps are
        object.__setattr__(self, "_host", {})  # t → (α_t, σ_t) as host floats, for timesteps shared by a batch

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers scheduler config (any of DDPM/DDIM/PNDM/LCM/DPMSolver… share these keys); a config whose
        values are of the wrong kind or range is refused in one line."""
        try:
            betas = betas_from_config(config)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"scheduler config: {' '.join(str(err).split())[:200]}") from None
        if len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("scheduler config: every beta must lie in (0, 1], over at least two timesteps")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if config.get("rescale_betas_zero_snr", False):
            alphas_cumprod[-1] = 2.0**-24  # as diffusers: keep σ/α finite at the zero-SNR end
        set_alpha_to_one = config.get("set_alpha_to_one", True)
        final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> NoiseSchedule:
        """From a diffusers model folder (``scheduler/scheduler_config.json``) or the config file itself."""
        path = Path(path)
        candidates = [path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
        for candidate in candidates:
            if candidate.is_file():
                return cls.from_config(json.loads(candidate.read_text()))
        raise ValueError(f"no scheduler_config.json under {path} (looked for {', '.join(map(str, candidates[1:]))})")

    # --- tables -------------------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t grid, log α) in float64 on ``device``, made once per device."""
        if device not in self._tables_on:
            grid = torch.arange(self.num_train_timesteps, dtype=torch.float64)
            self._tables_on[device] = (grid.to(device), self._log_alpha.to(device))
        return self._tables_on[device]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log α_t for t of any shape (integer or real, in [0, T−1]), float64, on ``t``'s device.

        On an accelerator the range check is skipped: reading the result would stall the device every step (the
        interpolation clamps t to the table either way).
        """
        t = torch.as_tensor(t).to(torch.float64)
        if t.device.type == "cpu" and not torch.all((t >= 0) & (t <= self.num_train_timesteps - 1)):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        grid, log_alpha = self._tables(t.device)
        return _interp(t, grid, log_alpha)  # exact table lookup at integer t

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), (-torch.expm1(2.0 * log_alpha)).sqrt()

    def alpha_sigma_to(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of a point a trajectory maps to: as :meth:`alpha_sigma`, but (1, 0) at t = 0 exactly, the clean
        end x0 itself rather than the schedule's first noise level."""
        alpha, sigma = self.alpha_sigma(t)
        clean = t == 0
        return torch.where(clean, 1.0, alpha), torch.where(clean, 0.0, sigma)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR λ_t = log α_t − log σ_t."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of λ_t (real-valued t): log α = −½ log(1 + e^{−2λ}), then invert the interpolated log α."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam, dtype=torch.float64), -2.0 * lam.to(torch.float64))
        grid, table = self._tables(log_alpha.device)
        # log α decreases with t: interpolate on the flipped (increasing) table.
        return _interp(log_alpha, table.flip(0), grid.flip(0))


# What FlowMatchEulerDiscreteScheduler's config may say and this schedule follows; the rest of its options (Karras,
# exponential or beta sigmas, inverted sigmas, a stretched terminal) change the sampler's grid in ways no teacher
# distilled here uses: such a config is refused rather than sampled on another grid than diffusers would.
_FLOW_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "shift_terminal",
)


@dataclass(frozen=True, eq=False)
class FlowSchedule(Schedule):
    """A rectified flow's schedule: ``z_t = (1 − σ_t) z0 + σ_t ε``, ``σ_t = t / T`` for real ``t ∈ [0, T]``.

    α_t = 1 − σ_t, so α + σ = 1 (not α² + σ² = 1: the conversions in :mod:`lcm.maths.parameterization` are written
    for any α, σ), and the half log-SNR is ``λ_t = log((1 − σ)/σ)``. ``shift`` (SD3's 3.0) or, with
    ``dynamic_shift``, a shift computed from the image's token count (Flux) decides *which* σ a sampler or a
    distillation visits (:meth:`shifted`); the network always sees ``t = T·σ``.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic_shift: bool = False
    base_shift: float = 0.5  # μ at base_image_seq_len tokens (Flux's defaults)
    max_shift: float = 1.15  # μ at max_image_seq_len tokens
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    final_alpha_cumprod: float = 1.0  # the last Euler step lands on σ = 0: the sample itself
    is_flow = True

    def __post_init__(self) -> None:
        if not 2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must lie in [2, {MAX_TRAIN_TIMESTEPS}]")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"the flow shift must be a finite number > 0, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        object.__setattr__(self, "_host", {})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowSchedule:
        """From a ``FlowMatch*Scheduler`` config (SD3's, Flux's); options it cannot follow are refused in one line."""
        used = [key for key in _FLOW_UNSUPPORTED if config.get(key)]
        if used:
            raise ValueError(f"scheduler config: {', '.join(used)} is not supported for flow-matching teachers")
        try:
            return cls(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                shift=float(config.get("shift", 1.0)),
                dynamic_shift=bool(config.get("use_dynamic_shifting", False)),
                base_shift=float(config.get("base_shift", 0.5)),
                max_shift=float(config.get("max_shift", 1.15)),
                base_image_seq_len=int(config.get("base_image_seq_len", 256)),
                max_image_seq_len=int(config.get("max_image_seq_len", 4096)),
                time_shift_type=str(config.get("time_shift_type", "exponential")),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheduler config: {' '.join(str(err).split())[:200]}") from None

    # --- the grid a sampler or a distillation visits ------------------------------------------------------------
    def mu(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent μ (diffusers' ``calculate_shift``): linear in the image's token count."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len

    def shifted(self, u: torch.Tensor | float, image_seq_len: int | None = None) -> torch.Tensor | float:
        """σ for an unshifted u ∈ [0, 1]: ``s·u / (1 + (s − 1)·u)``, or with dynamic shifting diffusers'
        ``time_shift(μ, 1, u)`` at μ(image_seq_len). Monotone, 0 ↦ 0 and 1 ↦ 1."""
        if isinstance(u, float | int):
            return float(self.shifted(torch.tensor(float(u), dtype=torch.float64), image_seq_len))
        if self.dynamic_shift:
            if image_seq_len is None:
                raise ValueError("a dynamically shifted schedule needs the image's token count")
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
            return mu / (mu + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    # --- α, σ, λ --------------------------------------------------------------------------------------------------
    def _sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).to(torch.float64)
        if t.device.type == "cpu" and not torch.all((t >= 0) & (t <= self.num_train_timesteps)):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}], got {t.tolist()}")
        return t / self.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self._sigma_of(t)
        return 1.0 - sigma, sigma

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """λ_t = log((1 − σ)/σ): +∞ at σ = 0, −∞ at σ = 1."""
        sigma = self._sigma_of(t)
        return torch.log1p(-sigma) - torch.log(sigma)

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of λ_t: σ = 1 / (1 + e^λ)."""
        return self.num_train_timesteps * torch.sigmoid(-lam.to(torch.float64))


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """The schedule a diffusers scheduler config describes: a flow's for ``FlowMatch*`` schedulers, else VP."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return FlowSchedule.from_config(config)
    return NoiseSchedule.from_config(config)
