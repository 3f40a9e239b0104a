"""Samplers: multistep consistency sampling (docs/design.md §4), TCD's stochastic sampler (docs/sampling.md) and the
teacher's DDIM / DPM-Solver baselines.

Every sampler is a free function over a callable (as k-diffusion's): the consistency function
``f(z [B,C,H,W], t) → x̂0`` for LCMs (t one host float, or ``[B]``), a denoiser ``(z, t) → Denoised(x0, eps)`` for
the teacher and for TCD (which reads the network's raw x̂0 and ε̂, at one host-float t). Guidance, conditioning and
the network live in the callable. Timesteps are float64/long ``[N]`` lists from
:mod:`lcm.maths.timesteps`; randomness comes from one generator per image, so image i is the same whatever the batch.
Every sampler takes an optional ``after_step`` (:data:`StepHook`) that may replace the latent after each step: how
inpainting with a text-to-image UNet re-imposes the known region (:func:`keep_known_region`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lcm.maths.parameterization import Denoised, append_dims
from lcm.maths.schedule import FlowSchedule, Schedule
from lcm.maths.solvers import Denoiser, dpm_solver_1_update, dpm_solver_pp_1_update
from lcm.maths.timesteps import tcd_intermediate_timesteps

__all__ = [
    "ConsistencyFn",
    "HostDenoiser",
    "StepHook",
    "keep_known_region",
    "randn_per_image",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_heun",
    "sample_lcm",
    "sample_tcd",
]

# f(z [B,C,H,W], t) → x̂0, with t per sample [B] or one host float for the whole batch (the samplers' case).
ConsistencyFn = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]
# (z [B,C,H,W], t) → Denoised(x̂0, ε̂), t one host float shared by the batch.
HostDenoiser = Callable[[torch.Tensor, float], Denoised]
# (z after step i [B,C,H,W], i) → the latent the sampler goes on from (after the last step: the result it returns).
StepHook = Callable[[torch.Tensor, int], torch.Tensor]


def randn_per_image(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal ``[B, *shape[1:]]``, image i drawn from ``generators[i]`` (as diffusers' ``randn_tensor``)."""
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} generators for a batch of {shape[0]}")
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generators]).to(device)


def _batched(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.reshape(1).expand(z.shape[0]).to(z.device)


def _after(after_step: StepHook | None, z: torch.Tensor, i: int) -> torch.Tensor:
    return z if after_step is None else after_step(z, i)


def keep_known_region(
    known: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule
) -> StepHook:
    """Inpainting with a text-to-image UNet: after step i, the region to keep (``mask`` 0) is replaced by the known
    latents ``known`` ``[B,C,h,w]`` noised with ``noise`` to the next timestep, ``α z_known + σ ε`` (after the last
    step: ``known`` itself); the region to repaint (``mask`` 1, ``[B,1,h,w]``) keeps the sampler's latent.

    ``(1 − m)·known_t + m·z``, as diffusers' ``StableDiffusionInpaintPipeline`` blends when its UNet has 4 input
    channels, with the same noise that started the run.
    """
    ts = [float(t) for t in timesteps.tolist()]

    def blend(z: torch.Tensor, i: int) -> torch.Tensor:
        known_t = schedule.add_noise(known, noise, ts[i + 1]) if i + 1 < len(ts) else known
        return (1 - mask) * known_t + mask * z

    return blend


@torch.no_grad()
def sample_lcm(
    f: ConsistencyFn,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator],
    after_step: StepHook | None = None,
    draw: Callable[..., torch.Tensor] = randn_per_image,
) -> torch.Tensor:
    """Multistep consistency sampling (Algorithm 1, Luo et al. 2023); ``z`` is the initial noise ``z_T``.

    ``f`` is called with one host-float timestep for the whole batch, so that ``f`` and the re-noising use cached
    host coefficients: nothing in the loop waits on the device or spends time on per-step scalar tensors. ``draw``
    (``(shape, generators, device, dtype) → noise``) draws the re-noising: :func:`randn_per_image`, or a model's
    own layout (Flux's pipeline draws it on packed latents: ``LatentDiffusion.randn_per_image``).
    """
    # Every draw happens before the loop (image i's generator gives the same numbers in the same order).
    noises = [draw(z.shape, generators, z.device, z.dtype) for _ in range(len(timesteps) - 1)]
    ts = [float(t) for t in timesteps.tolist()]
    for i, t in enumerate(ts):
        x0 = f(z, t)  # jump to the trajectory's origin
        # re-noise to the next, lower, timestep; after the last step the result is x̂0 itself
        z = schedule.add_noise(x0, noises[i], ts[i + 1]) if i + 1 < len(ts) else x0
        z = _after(after_step, z, i)
    return z


@torch.no_grad()
def sample_tcd(
    denoiser: HostDenoiser,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    gamma: float,
    generators: Sequence[torch.Generator],
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """TCD's strategic stochastic sampling (Zheng et al. 2024), step for step diffusers' ``TCDScheduler``.

    At each ``t_i``, with ``(x̂0, ε̂)`` the network's raw prediction (no consistency boundary scalings ``c_skip``,
    ``c_out``: TCDScheduler never applies them) and ``s_i = ⌊(1 − γ)·t_{i+1}⌋``
    (:func:`lcm.maths.timesteps.tcd_intermediate_timesteps`, ``t_N = 0``):

    - ``z_s = α_s x̂0 + σ_s ε̂`` (a DDIM step to ``s_i``);
    - if γ > 0 and this is not the last step: ``z = √(ᾱ_{t_{i+1}}/ᾱ_s)·z_s + √(1 − ᾱ_{t_{i+1}}/ᾱ_s)·ε_i``, the
      forward process from ``s_i`` back up to ``t_{i+1}``; otherwise ``z = z_s``.

    The result is the last ``z_s``, at ``s = 0``: ``α_0 x̂0 + σ_0 ε̂`` (t = 0, not x̂0, as diffusers returns it).
    ``z`` is the starting latent (pure noise, or a noised image for img2img). Noise is drawn only when γ > 0, one
    tensor per step but the last, all before the loop (image i's generator gives the same numbers in the same order
    as diffusers' per-step draws).
    """
    ts = [int(t) for t in timesteps.tolist()]
    ss = tcd_intermediate_timesteps(timesteps, gamma).tolist()
    stochastic = gamma > 0
    noises = [randn_per_image(z.shape, generators, z.device, z.dtype) for _ in range(len(ts) - 1)] if stochastic else []
    for i, t in enumerate(ts):
        d = denoiser(z, float(t))
        alpha_s, sigma_s = schedule.alpha_sigma_at(float(ss[i]))
        z = alpha_s * d.x0 + sigma_s * d.eps
        if stochastic and i + 1 < len(ts):
            alpha_next, _ = schedule.alpha_sigma_at(float(ts[i + 1]))
            ratio = (alpha_next / alpha_s) ** 2  # ᾱ_{t_{i+1}} / ᾱ_s ≤ 1
            z = math.sqrt(ratio) * z + math.sqrt(1.0 - ratio) * noises[i]
        z = _after(after_step, z, i)
    return z


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) along ``timesteps``; the last step lands on ``schedule.final_alpha_cumprod``.

    The step after ``timesteps[i]`` is ``timesteps[i+1]``; for the spacings diffusers uses with SD ("leading",
    and "trailing" when N divides T) this is the same as diffusers' ``t − T // N``.
    """
    final = torch.tensor(schedule.final_alpha_cumprod, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        d = denoiser(z, _batched(t, z))
        if i + 1 < len(timesteps):
            alpha, sigma = schedule.alpha_sigma(_batched(timesteps[i + 1], z))
        else:
            alpha, sigma = final.sqrt().expand(z.shape[0]), (1 - final).sqrt().expand(z.shape[0])
        z = append_dims(alpha, z) * d.x0 + append_dims(sigma, z) * d.eps
        z = _after(after_step, z, i)
    return z


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: FlowSchedule,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """Heun's method in σ on a flow's ODE ``dz/dσ = v = ε̂ − x̂0``, as diffusers' ``FlowMatchHeunDiscreteScheduler``
    (no churn): from σ_i to σ_{i+1} an Euler step with v(z, σ_i), then, unless σ_{i+1} = 0 (the last step), the
    average of that velocity and v at the Euler point. ``N`` steps make ``2N − 1`` network calls."""
    if not isinstance(schedule, FlowSchedule):
        raise ValueError("Heun's sampler is for flow-matching models")
    ts = timesteps.to(torch.float64)
    sigmas = torch.cat([schedule.sigma(ts), ts.new_zeros(1)]).tolist()
    for i, t in enumerate(ts):
        d = denoiser(z, _batched(t, z))
        v = d.eps - d.x0
        dt = sigmas[i + 1] - sigmas[i]
        z_next = z + dt * v
        if i + 1 < len(ts):
            d_next = denoiser(z_next, _batched(ts[i + 1], z))
            z_next = z + dt * (0.5 * (v + (d_next.eps - d_next.x0)))
        z = _after(after_step, z_next, i)
    return z


@torch.no_grad()
def sample_dpm_solver(
    denoiser: Denoiser,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    data_prediction: bool,
    lower_order_final: bool = True,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """2nd-order multistep DPM-Solver (noise form) or DPM-Solver++(2M) (data form), midpoint variant.

    As diffusers' ``DPMSolverMultistepScheduler`` (solver_order=2): the first step is 1st order; DPM-Solver++ ends
    at σ = 0 (returns x̂0), DPM-Solver at t = 0 (its noise form cannot reach σ = 0); the last step is 1st order
    when it lands on σ = 0, or with ``lower_order_final`` and fewer than 15 steps.
    """
    n, batch = len(timesteps), z.shape[0]
    alphas, sigmas = schedule.alpha_sigma(timesteps.to(torch.float64))
    if data_prediction:
        alphas, sigmas = torch.cat([alphas, alphas.new_ones(1)]), torch.cat([sigmas, sigmas.new_zeros(1)])
    else:
        a0, s0 = schedule.alpha_sigma(torch.zeros(1))
        alphas, sigmas = torch.cat([alphas, a0]), torch.cat([sigmas, s0])
    lambdas = alphas.log() - sigmas.log()
    update = dpm_solver_pp_1_update if data_prediction else dpm_solver_1_update
    prev = None  # the previous model output (x̂0 or ε̂)
    for i, t in enumerate(timesteps):
        d = denoiser(z, _batched(t, z))
        m = d.x0 if data_prediction else d.eps
        a_s, s_s, a_t, s_t = (v.expand(batch) for v in (alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]))
        last = i == n - 1
        first_order = prev is None or (last and (data_prediction or (lower_order_final and n < 15)))
        if first_order:
            z = update(z, m, a_s, s_s, a_t, s_t)
        else:
            # D1 = (m0 − m1)/r0 with r0 = h_{i−1}/h_i; the midpoint rule adds ½·(first-order coefficient)·D1.
            h, h_prev = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[i - 1]
            m_ext = m + 0.5 * float(h / h_prev) * (m - prev)
            z = update(z, m_ext, a_s, s_s, a_t, s_t)
        z = _after(after_step, z, i)
        prev = m
    return z
