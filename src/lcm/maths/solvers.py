"""ODE solvers Ψ(z_s, s → t) for the (guidance-augmented) probability-flow ODE (docs/design.md §2).

A solver takes a *denoiser* — any callable ``(z [B,C,H,W], t [B]) → Denoised(x0, eps)``, typically the guided
teacher — so that 2nd-order solvers can call it twice. ``s > t`` per sample; t may differ across the batch.

- DDIM (Song et al. 2021): ``z_t = α_t x̂0 + σ_t ε̂``. One denoiser call.
- DPM-Solver-2 (Lu et al. 2022a, Alg. 1, r₁ = ½): singlestep, noise form, midpoint ``λ_u = λ_s + h/2``. Two calls.
- DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = ½): singlestep, data form, same midpoint. Two calls.
- Heun (flow-matching teachers only): Euler in σ on ``dz/dσ = v``, then the average of both velocities; a step that
  ends at σ = 0 stays Euler, as diffusers' ``FlowMatchHeunDiscreteScheduler`` ends. Two calls.

The 1st-order exponential-integrator updates of both families are written out too: they are algebraically DDIM
(a test) and serve the multistep samplers in :mod:`lcm.maths.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

from lcm.maths.parameterization import Denoised, append_dims
from lcm.maths.schedule import Schedule

__all__ = [
    "Denoiser",
    "Solver",
    "ddim_step",
    "dpm_solver_1_update",
    "dpm_solver_2_step",
    "dpm_solver_pp_1_update",
    "dpm_solver_pp_2s_step",
    "heun_step",
    "solve",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], Denoised]


class Solver(str, Enum):
    """The ODE solver Ψ of LCD (one step from t_{n+k} to t_n); values are the CLI's spellings.

    Both 2nd-order solvers are *singlestep* (2S): the teacher samplers of the same names in
    :class:`lcm.sample.Sampler` are the *multistep* (2M) variants.
    """

    DDIM = "ddim"
    DPM_SOLVER_2 = "dpm"  # DPM-Solver-2, singlestep, noise form
    DPM_SOLVER_PP_2S = "dpmpp"  # DPM-Solver++(2S), singlestep, data form
    HEUN = "heun"  # Heun's method in σ, flow-matching teachers only

    @property
    def flow_only(self) -> bool:
        """Heun's method is written in σ for a flow's ODE; the others serve both families."""
        return self is Solver.HEUN


def _log_snr_step(
    alpha_s: torch.Tensor, sigma_s: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor
) -> torch.Tensor:
    """h = λ_t − λ_s (float64); +∞ when σ_t = 0."""
    return (alpha_t.log() - sigma_t.log()) - (alpha_s.log() - sigma_s.log())


def dpm_solver_1_update(
    z: torch.Tensor,
    eps: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    """1st-order DPM-Solver (noise form): ``z_t = (α_t/α_s) z_s − σ_t (e^h − 1) ε̂``."""
    h = _log_snr_step(alpha_s, sigma_s, alpha_t, sigma_t)
    return append_dims(alpha_t / alpha_s, z) * z - append_dims(sigma_t * torch.expm1(h), z) * eps


def dpm_solver_pp_1_update(
    z: torch.Tensor,
    x0: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    """1st-order DPM-Solver++ (data form): ``z_t = (σ_t/σ_s) z_s − α_t (e^{−h} − 1) x̂0``; exact at σ_t = 0."""
    h = _log_snr_step(alpha_s, sigma_s, alpha_t, sigma_t)
    return append_dims(sigma_t / sigma_s, z) * z - append_dims(alpha_t * torch.expm1(-h), z) * x0


def ddim_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """Deterministic DDIM from s to t: ``α_t x̂0 + σ_t ε̂`` (exact for an exact denoiser)."""
    d = denoiser(z, s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    return append_dims(alpha_t, z) * d.x0 + append_dims(sigma_t, z) * d.eps


def _midpoint(schedule: Schedule, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """u with λ_u = (λ_s + λ_t)/2, real-valued, mapped back through the interpolated schedule."""
    return schedule.t_of_lambda(0.5 * (schedule.lambda_(s) + schedule.lambda_(t)))


def dpm_solver_2_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """DPM-Solver-2: ``z_u = (α_u/α_s) z_s − σ_u (e^{h/2} − 1) ε̂(z_s, s)``,
    ``z_t = (α_t/α_s) z_s − σ_t (e^h − 1) ε̂(z_u, u)``."""
    u = _midpoint(schedule, s, t)
    (alpha_s, sigma_s), (alpha_u, sigma_u), (alpha_t, sigma_t) = map(schedule.alpha_sigma, (s, u, t))
    z_u = dpm_solver_1_update(z, denoiser(z, s).eps, alpha_s, sigma_s, alpha_u, sigma_u)
    return dpm_solver_1_update(z, denoiser(z_u, u).eps, alpha_s, sigma_s, alpha_t, sigma_t)


def dpm_solver_pp_2s_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """DPM-Solver++(2S): ``z_u = (σ_u/σ_s) z_s − α_u (e^{−h/2} − 1) x̂0(z_s, s)``,
    ``z_t = (σ_t/σ_s) z_s − α_t (e^{−h} − 1) x̂0(z_u, u)`` (with r = ½, D = x̂0(z_u, u))."""
    u = _midpoint(schedule, s, t)
    (alpha_s, sigma_s), (alpha_u, sigma_u), (alpha_t, sigma_t) = map(schedule.alpha_sigma, (s, u, t))
    z_u = dpm_solver_pp_1_update(z, denoiser(z, s).x0, alpha_s, sigma_s, alpha_u, sigma_u)
    return dpm_solver_pp_1_update(z, denoiser(z_u, u).x0, alpha_s, sigma_s, alpha_t, sigma_t)


def heun_step(denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """Heun in σ for a flow: ``z' = z + (σ_t − σ_s)·v(z, s)``, ``z_t = z + (σ_t − σ_s)·(v(z, s) + v(z', t))/2``, per
    sample; where σ_t = 0 the Euler point is kept."""
    if not schedule.is_flow:
        raise ValueError("the heun solver is for flow-matching teachers; use ddim, dpm or dpmpp")
    d = denoiser(z, s)
    v = d.eps - d.x0
    dt = append_dims(schedule.sigma(t) - schedule.sigma(s), z)
    euler = z + dt * v
    d_end = denoiser(euler, t)
    heun = z + dt * (0.5 * (v + (d_end.eps - d_end.x0)))
    return torch.where(append_dims(t > 0, z).to(torch.bool), heun, euler)


_STEPS = {
    Solver.DDIM: ddim_step,
    Solver.DPM_SOLVER_2: dpm_solver_2_step,
    Solver.DPM_SOLVER_PP_2S: dpm_solver_pp_2s_step,
    Solver.HEUN: heun_step,
}


def solve(
    solver: Solver, denoiser: Denoiser, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """Ψ(z_s, s → t) with the chosen solver: the estimate ẑ_t of LCD's target."""
    return _STEPS[Solver(solver)](denoiser, z, s, t, schedule)
