"""Closed-form tests of the ODE solvers (docs/design.md §2)."""

import pytest
import torch

from lcm.maths.parameterization import Denoised, append_dims
from lcm.maths.schedule import NoiseSchedule
from lcm.maths.solvers import (
    Solver,
    ddim_step,
    dpm_solver_1_update,
    dpm_solver_pp_1_update,
    solve,
)
from lcm.maths.timesteps import SkippingGrid

SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
SHAPE = (6, 2, 4, 4)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


def _pairs():
    s = torch.tensor([999, 999, 759, 500, 39, 19])
    t = torch.tensor([979, 0, 499, 100, 19, 0])
    return s, t


def _exact_denoiser(x0, eps):
    """A denoiser that knows the answer: (x0, ε) of the one trajectory z_t = α_t x0 + σ_t ε."""
    return lambda z, t: Denoised(x0, eps)


def test_ddim_is_exact_for_an_exact_predictor():
    x0, eps = _state()
    s, t = _pairs()
    a_s, s_s = SCHEDULE.alpha_sigma(s)
    a_t, s_t = SCHEDULE.alpha_sigma(t)
    z_s = append_dims(a_s, x0) * x0 + append_dims(s_s, x0) * eps
    z_t = ddim_step(_exact_denoiser(x0, eps), z_s, s, t, SCHEDULE)
    torch.testing.assert_close(z_t, append_dims(a_t, x0) * x0 + append_dims(s_t, x0) * eps, rtol=1e-12, atol=1e-12)


def test_first_order_dpm_solvers_equal_ddim():
    x0, eps = _state(1)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s, t = _pairs()
    a_s, s_s = SCHEDULE.alpha_sigma(s)
    a_t, s_t = SCHEDULE.alpha_sigma(t)
    # a consistent (x̂0, ε̂) pair at z_s, as any parameterisation's conversion yields
    eps_hat = (z - append_dims(a_s, z) * x0) / append_dims(s_s, z)
    ddim = ddim_step(lambda zz, tt: Denoised(x0, eps_hat), z, s, t, SCHEDULE)
    torch.testing.assert_close(dpm_solver_1_update(z, eps_hat, a_s, s_s, a_t, s_t), ddim, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dpm_solver_pp_1_update(z, x0, a_s, s_s, a_t, s_t), ddim, rtol=1e-10, atol=1e-10)


def _constant_x0_denoiser(c):
    def denoise(z, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        return Denoised(c.expand_as(z), (z - append_dims(alpha, z) * c) / append_dims(sigma, z))

    return denoise


@pytest.mark.parametrize("solver", [s for s in Solver if not s.flow_only])
def test_all_solvers_exact_for_a_constant_denoiser(solver):
    """With D(z, t) ≡ c the PF-ODE solution is z_t = α_t c + (σ_t/σ_s)(z_s − α_s c)."""
    c = torch.full(SHAPE[1:], 0.3, dtype=torch.float64)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    s, t = _pairs()
    a_s, s_s = SCHEDULE.alpha_sigma(s)
    a_t, s_t = SCHEDULE.alpha_sigma(t)
    exact = append_dims(a_t, z) * c + append_dims(s_t / s_s, z) * (z - append_dims(a_s, z) * c)
    out = solve(solver, _constant_x0_denoiser(c), z, s, t, SCHEDULE)
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)


def _gaussian_problem(mu=0.5, std=0.3):
    """Data x0 ~ N(μ, std²) per dimension: the exact denoiser and the exact PF-ODE flow are closed forms."""

    def denoise(z, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        a, s = append_dims(alpha, z), append_dims(sigma, z)
        x0 = mu + a * std**2 / (a**2 * std**2 + s**2) * (z - a * mu)  # E[x0 | z_t]
        return Denoised(x0, (z - a * x0) / s)

    def flow(z, s, t):
        (a_s, s_s), (a_t, s_t) = SCHEDULE.alpha_sigma(s), SCHEDULE.alpha_sigma(t)
        scale = ((a_t**2 * std**2 + s_t**2) / (a_s**2 * std**2 + s_s**2)).sqrt()
        return append_dims(a_t, z) * mu + append_dims(scale, z) * (z - append_dims(a_s, z) * mu)

    return denoise, flow


@pytest.mark.parametrize("num_solver_steps", [50, 10])
def test_second_order_solvers_beat_ddim_on_gaussian_data(num_solver_steps):
    """On every (t_{n+k}, t_n) pair of the skipping grid, both 2nd-order solvers land closer to the exact flow."""
    denoise, flow = _gaussian_problem()
    grid = SkippingGrid(num_solver_steps)
    s = grid.timesteps
    t = (s - grid.k).clamp(min=0)
    z = torch.randn(len(s), 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = flow(z, s, t)
    solvers = [solver for solver in Solver if not solver.flow_only]
    err = {solver: (solve(solver, denoise, z, s, t, SCHEDULE) - exact).flatten(1).abs().amax(1) for solver in solvers}
    assert torch.all(err[Solver.DPM_SOLVER_2] < 0.9 * err[Solver.DDIM]), err
    assert torch.all(err[Solver.DPM_SOLVER_PP_2S] < 0.5 * err[Solver.DDIM]), err


@pytest.mark.parametrize("start", [999, 400, 150])
def test_convergence_order_on_gaussian_data(start):
    """Halving the step divides the local error by ~4 for DDIM (1st order) and by ~8 for the 2nd-order solvers."""
    denoise, flow = _gaussian_problem()
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = torch.tensor([start])

    def error(solver, step):
        t = s - step
        return (solve(solver, denoise, z, s, t, SCHEDULE) - flow(z, s, t)).abs().max().item()

    ratios = {solver: error(solver, 20) / error(solver, 10) for solver in Solver if not solver.flow_only}
    assert 3.0 < ratios[Solver.DDIM] < 5.0, ratios
    assert ratios[Solver.DPM_SOLVER_2] > 6.5 and ratios[Solver.DPM_SOLVER_PP_2S] > 6.5, ratios


def test_solver_parsing_and_calls():
    assert Solver("dpmpp") is Solver.DPM_SOLVER_PP_2S
    with pytest.raises(ValueError):
        Solver("euler")
