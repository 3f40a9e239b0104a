"""Discrete timestep lists: the skipping-step grid of LCD, its training pairs, and the samplers' schedules.

Every list here reproduces the installed diffusers scheduler's ``set_timesteps`` (tested for parity), so that a
model trained or sampled here sees exactly the timesteps it would see in diffusers. :func:`sampler_timesteps` is the
one answer to "which timesteps does this sampler visit", for ``lcm sample``, ``lcm eval``, ``lcm serve``, the demo
and validation grids alike (docs/sampling.md, "Timesteps").
"""

from __future__ import annotations

import math
from enum import Enum
from functools import lru_cache

import numpy as np
import torch

from lcm.maths.schedule import FlowSchedule, Schedule

__all__ = [
    "phase_edge_below",
    "trajectory_targets",
    "DEFAULT_NUM_SOLVER_STEPS",
    "DEFAULT_SPACING",
    "SPACINGS",
    "MixedGrid",
    "Sampler",
    "sampler_timesteps",
    "SkippingGrid",
    "ddim_timesteps",
    "flow_trailing_timesteps",
    "flow_timesteps",
    "FlowGrid",
    "dpm_solver_timesteps",
    "img2img_start",
    "lcm_timesteps",
    "tcd_intermediate_timesteps",
]


# N, the number of points of LCD's skipping grid (k = T // N): the paper's and diffusers' 50, written once. An LCM
# samples on the grid it was distilled on (its LCMScheduler's original_inference_steps), this one when it records none.
DEFAULT_NUM_SOLVER_STEPS = 50
# The teacher samplers' one spacing rule: "trailing", so that every schedule, one step included, starts at t = T − 1
# (with SD's "leading" a 1-step DDIM starts at t = 1 and returns noise). "config" keeps a scheduler config's own.
DEFAULT_SPACING = "trailing"
SPACINGS = ("trailing", "leading", "linspace", "config")


class Sampler(str, Enum):
    """How images are drawn; values are the CLI's spellings. The DPM samplers are *multistep* (2M), unlike the
    singlestep LCD solvers of the same names (:class:`lcm.maths.solvers.Solver`)."""

    LCM = "lcm"  # multistep consistency sampling (LCMs only)
    TCD = "tcd"  # Trajectory Consistency Distillation's stochastic sampler, gamma (consistency-distilled models)
    DDIM = "ddim"
    DPM_SOLVER_2M = "dpm"  # DPM-Solver, 2nd-order multistep
    DPM_SOLVER_PP_2M = "dpmpp"  # DPM-Solver++(2M)
    HEUN = "heun"  # Heun's 2nd-order method in σ (flow-matching teachers: FlowMatchHeunDiscreteScheduler)

    @property
    def for_distilled(self) -> bool:
        """A sampler of consistency-distilled models (LCM, TCD), which run one network call per step unguided."""
        return self in (Sampler.LCM, Sampler.TCD)


def sampler_timesteps(
    sampler: Sampler,
    steps: int,
    scheduler_config: dict,
    schedule: Schedule,
    strength: float = 1.0,
    spacing: str | None = None,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """The timesteps ``sampler`` visits in ``steps`` steps (descending, long), from noise or, with ``strength`` < 1,
    from an image noised for img2img. As the diffusers pipeline that runs each sampler:

    - LCM and TCD: ``LCMScheduler`` / ``TCDScheduler`` on the skipping grid the model was distilled on (its config's
      ``original_inference_steps``); LCM img2img spreads ``steps`` over the grid's first
      ``int(N·strength)`` points (``LatentConsistencyModelImg2ImgPipeline``);
    - DDIM, DPM-Solver(++): ``spacing`` (None: :data:`DEFAULT_SPACING`; "config": the scheduler config's own);
    - img2img with DDIM, DPM-Solver(++) and TCD: the last ``int(steps·strength)`` of the ``steps``-step schedule
      (``StableDiffusionImg2ImgPipeline``, :func:`img2img_start`).

    A one-line ``ValueError`` for a strength that leaves no step, or (LCM) fewer grid points than ``steps``.

    A flow-matching model (:class:`FlowSchedule`; ``image_seq_len``: its token count, for a dynamic shift) samples
    with Euler (the ``ddim`` sampler, DDIM's update being the flow's Euler step) or Heun, and as an LCM, on
    :func:`flow_trailing_timesteps` (the "trailing" rule: every step a real jump, as Flux's pipeline spaces them);
    any other spacing is ``FlowMatchEulerDiscreteScheduler``'s own (:func:`flow_timesteps`, SD3's pipeline).
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if isinstance(schedule, FlowSchedule):
        if strength < 1:
            raise ValueError("img2img (strength < 1) is not supported for flow-matching models")
        if sampler is Sampler.LCM or (
            sampler in (Sampler.DDIM, Sampler.HEUN) and (spacing or DEFAULT_SPACING) == "trailing"
        ):
            return flow_trailing_timesteps(steps, schedule, image_seq_len)
        if sampler in (Sampler.DDIM, Sampler.HEUN):
            return flow_timesteps(steps, schedule, image_seq_len)
        raise ValueError(f"a flow-matching model samples with ddim (Euler), heun or lcm, not {sampler.value}")
    if sampler is Sampler.HEUN:
        raise ValueError("the heun sampler is for flow-matching models; use ddim, dpm or dpmpp")
    num_train = schedule.num_train_timesteps
    if sampler.for_distilled:
        original = int(scheduler_config.get("original_inference_steps", DEFAULT_NUM_SOLVER_STEPS))
        if sampler is Sampler.LCM and strength < 1:
            if int(original * strength) < steps:
                raise ValueError(
                    f"strength {strength} keeps int({original}·{strength}) = {int(original * strength)} timesteps of "
                    f"this LCM's {original}-point skipping grid, fewer than the {steps} steps asked for: "
                    "raise the strength or lower the steps"
                )
            return lcm_timesteps(steps, original, num_train, strength)
        full = lcm_timesteps(steps, original, num_train)
    else:
        chosen = spacing or DEFAULT_SPACING
        if chosen == "config":
            chosen = scheduler_config.get("timestep_spacing", "leading" if sampler is Sampler.DDIM else "linspace")
        offset = int(scheduler_config.get("steps_offset", 0))
        if sampler is Sampler.DDIM:
            full = ddim_timesteps(steps, num_train, chosen, offset)
        else:
            full = dpm_solver_timesteps(steps, schedule, chosen, offset)
    return full if strength == 1 else full[img2img_start(len(full), strength) :]


def flow_timesteps(num_steps: int, schedule: FlowSchedule, image_seq_len: int | None = None) -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps`` (float64 ``[N]``, descending; the sampler ends at σ = 0).

    ``num_steps`` values of t evenly spaced from T·σ_max to T·σ_min, then shifted: σ_max = 1 and σ_min is the
    scheduler's smallest training σ, 1/T, itself shifted when the shift is static (as diffusers builds it at
    construction, so a static shift acts twice on σ_min). 4 steps, shift 1: 1000, 667, 334, 1.
    """
    T = schedule.num_train_timesteps
    _check_steps(num_steps, T)
    sigma_min = float(np.float32(1.0 / T) if schedule.dynamic_shift else np.float32(schedule.shifted(1.0 / T)))
    ts = np.linspace(T * 1.0, sigma_min * T, num_steps)
    return T * schedule.shifted(torch.from_numpy(ts / T), image_seq_len)


def flow_trailing_timesteps(num_steps: int, schedule: FlowSchedule, image_seq_len: int | None = None) -> torch.Tensor:
    """The "trailing" timesteps of a flow (float64 ``[N]``, descending): unshifted u = 1, 1 − 1/N, …, 1/N, shifted,
    as t = T·σ. 4 steps, shift 1: 1000, 750, 500, 250.

    Every step is a real jump: ``FlowMatchEulerDiscreteScheduler``'s own rule spends its last step on σ = 1/T → 0,
    which changes nothing (its 2 steps are 1 step). Flux's pipeline spaces its σ so; for SD3's, pass them:
    ``pipe(..., sigmas=[1, 0.75, 0.5, 0.25])`` visits the same timesteps (the scheduler shifts them). A flow LCM is
    distilled at every σ (:class:`FlowGrid`), so it samples on these or on any others.
    """
    _check_steps(num_steps, schedule.num_train_timesteps)
    u = 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    return schedule.num_train_timesteps * schedule.shifted(u, image_seq_len)


class FlowGrid:
    """LCD's pairs for a flow teacher: ``u ~ U[1/N, 1]`` and ``u − 1/N`` (unshifted), each mapped to t = T·σ(u).

    The skipping grid of :class:`SkippingGrid` with a random offset per sample: the solver's step is one N-th of the
    unshifted range as there, but every σ is trained, so the student is a consistency function at any timestep a
    diffusers flow scheduler visits (``FlowMatchLCMScheduler`` spaces them linearly in t). ``image_seq_len`` fixes
    a dynamic shift.
    """

    def __init__(self, num_solver_steps: int, schedule: FlowSchedule, image_seq_len: int | None = None):
        if not 1 <= num_solver_steps <= schedule.num_train_timesteps:
            raise ValueError(
                f"the number of solver steps N must lie in [1, {schedule.num_train_timesteps}], got {num_solver_steps}"
            )
        self.num_solver_steps, self.schedule, self.image_seq_len = num_solver_steps, schedule, image_seq_len

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, image_seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` pairs (t_{n+k}, t_n), each ``[B]`` float64 (``image_seq_len``: the batch's token
        count, for a dynamic shift)."""
        step = 1.0 / self.num_solver_steps
        u = step + (1.0 - step) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        T, tokens = self.schedule.num_train_timesteps, image_seq_len or self.image_seq_len
        return T * self.schedule.shifted(u, tokens), T * self.schedule.shifted((u - step).clamp(min=0.0), tokens)


class SkippingGrid:
    """The skipping-step grid of LCD (Luo et al. 2023 §4.3): ``N`` solver timesteps, skip ``k = T // N``.

    ``t_n ∈ {k−1, 2k−1, …, N·k−1}``; a training sample draws ``t_{n+k}`` from the grid and sets
    ``t_n = max(t_{n+k} − k, 0)``. ``bias`` γ draws the i-th grid point (i = 1 … N, ascending t) with probability
    ∝ i^γ: 0 is the paper's uniform draw, γ > 0 draws the high-noise end, where few-step sampling starts, more often.
    """

    def __init__(
        self, num_solver_steps: int = DEFAULT_NUM_SOLVER_STEPS, num_train_timesteps: int = 1000, bias: float = 0.0
    ):
        if not 1 <= num_solver_steps <= num_train_timesteps:
            raise ValueError(
                f"the number of solver steps N must lie in [1, {num_train_timesteps}], got {num_solver_steps}"
            )
        if not math.isfinite(bias) or bias < 0:
            raise ValueError(f"the timestep bias must be a finite number >= 0, got {bias}")
        self.num_solver_steps = num_solver_steps
        self.k = num_train_timesteps // num_solver_steps
        self.timesteps = torch.arange(1, num_solver_steps + 1, dtype=torch.long) * self.k - 1  # (N,) ascending
        self.bias = bias
        weights = torch.arange(1, num_solver_steps + 1, dtype=torch.float64) ** bias
        self.probabilities = weights / weights.sum()  # (N,), of each grid point as t_{n+k}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` pairs (t_{n+k}, t_n), each ``[B]`` long: uniformly over the grid, or by ``bias``."""
        if self.bias == 0:
            index = torch.randint(0, self.num_solver_steps, (batch_size,), generator=generator)
        else:
            index = torch.multinomial(self.probabilities, batch_size, replacement=True, generator=generator)
        start = self.timesteps[index]
        return start, (start - self.k).clamp(min=0)


def phase_edge_below(t: torch.Tensor, grid: SkippingGrid, phases: int) -> torch.Tensor:
    """PCM's target time for pairs starting at ``t`` ``[B]``: the highest phase edge below ``t``. The ``phases`` M
    split the grid's N points into M runs of N / M; the edges are 0 and the grid points ending each run but the last
    (N = 10, k = 100, M = 2: edges 0 and 499), so a pair (t_{n+k}, t_n) never crosses an edge."""
    if phases < 1 or grid.num_solver_steps % phases:
        raise ValueError(f"the phases ({phases}) must divide the grid's {grid.num_solver_steps} points")
    run = grid.num_solver_steps // phases  # grid points per phase
    index = (t + 1) // grid.k  # 1-based index of t on the grid
    phase = (index - 1) // run  # 0 … M − 1
    return torch.where(phase == 0, torch.zeros_like(t), phase * run * grid.k - 1)


def trajectory_targets(t_end: torch.Tensor, grid: SkippingGrid, generator: torch.Generator | None) -> torch.Tensor:
    """TCD's target times for pairs ending at ``t_end`` ``[B]``: s drawn uniformly from 0 and the grid points at or
    below ``t_end``, so the trajectory consistency function learns to map onto every earlier point of the grid."""
    below = (t_end + 1) // grid.k  # grid points t_i = i·k − 1 ≤ t_end
    u = torch.rand(t_end.shape, generator=generator).to(t_end.device)  # drawn where the generator is (the CPU)
    choice = (u * (below + 1)).long()  # 0 … below
    return torch.where(choice == 0, torch.zeros_like(t_end), choice * grid.k - 1)


class MixedGrid:
    """Two skipping grids in one batch: each pair is drawn on ``coarse`` with probability ``fraction``, otherwise
    on ``fine`` (docs/fidelity.md). Every pair is still a pair of one grid: (t_{n+k}, t_{n+k} − k) with that grid's k.
    """

    def __init__(self, fine: SkippingGrid, coarse: SkippingGrid, fraction: float):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the coarse fraction must lie in [0, 1], got {fraction}")
        self.fine, self.coarse, self.fraction = fine, coarse, fraction

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` pairs (t_{n+k}, t_n), each ``[B]`` long, each on the grid its coin chose."""
        fine_start, fine_end = self.fine.sample(batch_size, generator)
        coarse_start, coarse_end = self.coarse.sample(batch_size, generator)
        coarse = torch.rand(batch_size, generator=generator) < self.fraction
        return torch.where(coarse, coarse_start, fine_start), torch.where(coarse, coarse_end, fine_end)


def lcm_timesteps(
    num_steps: int,
    original_inference_steps: int = DEFAULT_NUM_SOLVER_STEPS,
    num_train_timesteps: int = 1000,
    strength: float = 1.0,
) -> torch.Tensor:
    """``LCMScheduler.set_timesteps``: ``num_steps`` evenly spaced indices into the reversed skipping grid.

    4 steps with the defaults → 999, 759, 499, 259.
    """
    return torch.tensor(_lcm_timesteps(num_steps, original_inference_steps, num_train_timesteps, strength))


@lru_cache(maxsize=256)
def _lcm_timesteps(num_steps: int, original_inference_steps: int, num_train_timesteps: int, strength: float):
    """:func:`lcm_timesteps` as a tuple, computed once per setting (a real-time sampler asks on every image)."""
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"original_inference_steps must lie in [1, {num_train_timesteps}]")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, int(original_inference_steps * strength) + 1) * k - 1)[::-1]
    if not 1 <= num_steps <= len(origin):
        raise ValueError(f"the number of LCM steps must lie in [1, {len(origin)}], got {num_steps}")
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return tuple(int(t) for t in origin[indices])


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
    schedule: Schedule,
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


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first of ``num_steps`` timesteps that an img2img run at ``strength`` keeps.

    ``StableDiffusionImg2ImgPipeline.get_timesteps``: ``int(N·strength)`` steps are run (the last ones of the N-step
    schedule); the image is noised to the first of them. Used for the teacher samplers and TCD; the LCM sampler
    instead passes ``strength`` to :func:`lcm_timesteps`, as ``LatentConsistencyModelImg2ImgPipeline`` does.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} of {num_steps} steps runs int({num_steps}·{strength}) = 0 steps: "
            f"raise the strength to at least {1 / num_steps:.3g} or the number of steps"
        )
    return num_steps - kept


def tcd_intermediate_timesteps(timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """TCD's intermediate timesteps ``s_i = ⌊(1 − γ)·t_{i+1}⌋`` (``[N]`` long), with ``t_N = 0`` after the last step.

    ``TCDScheduler.step`` (Zheng et al. 2024, "strategic stochastic sampling"): step i goes from ``t_i`` down to
    ``s_i`` deterministically, then forward to ``t_{i+1}`` with fresh noise; γ = 0 is DDIM-like, γ = 1 jumps to
    ``s = 0`` every step. The product is taken in float32 on the long timesteps, as diffusers computes it, so the
    floor lands on the same integer when ``(1 − γ)·t`` is within rounding of one.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    following = torch.cat([timesteps.long().reshape(-1)[1:], torch.zeros(1, dtype=torch.long)])
    return torch.stack([torch.floor((1 - gamma) * t).to(torch.long) for t in following])
