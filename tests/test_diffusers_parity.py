"""Parity with the installed diffusers schedulers: timesteps and whole sampling loops (≤ 1e-5 relative)."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from lcm.maths.consistency import boundary_scalings, consistency_function
from lcm.maths.parameterization import PredictionType, to_denoised
from lcm.maths.sampling import randn_per_image, sample_ddim, sample_dpm_solver, sample_lcm
from lcm.maths.schedule import NoiseSchedule
from lcm.maths.timesteps import SkippingGrid, ddim_timesteps, dpm_solver_timesteps, lcm_timesteps

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SD_DDIM = {**SD, "clip_sample": False}  # as SD's own scheduler config; DDIMScheduler's default clips x0
PTYPES = ["epsilon", "v_prediction"]
SHAPE = (3, 4, 8, 8)


def fake_net(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent stand-in for a UNet, identical in both loops."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.6 * z + 0.3 * torch.sin(1.7 * z + t / 250.0)


def _generators(n=SHAPE[0], base=100):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _denoiser(schedule, ptype):
    ptype = PredictionType(ptype)

    def denoise(z, t):
        alpha, sigma = schedule.alpha_sigma(t)
        return to_denoised(fake_net(z, t), z, alpha, sigma, ptype)

    return denoise


# --- timesteps ---------------------------------------------------------------------------------------------------
def test_lcm_timesteps_match_lcm_scheduler():
    sched = LCMScheduler(**SD)
    for n in range(1, 9):
        sched.set_timesteps(n)
        assert lcm_timesteps(n).tolist() == sched.timesteps.tolist(), n
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    for original in (20, 50, 100):
        sched.set_timesteps(4, original_inference_steps=original)
        assert lcm_timesteps(4, original_inference_steps=original).tolist() == sched.timesteps.tolist()


def test_skipping_grid_matches_lcm_origin_schedule_and_pairs():
    grid = SkippingGrid(50)
    assert grid.k == 20 and grid.timesteps[0] == 19 and grid.timesteps[-1] == 999 and len(grid.timesteps) == 50
    sched = LCMScheduler(**SD)
    sched.set_timesteps(50)  # LCM's 50-step schedule is the whole grid
    assert sorted(sched.timesteps.tolist()) == grid.timesteps.tolist()
    start, end = grid.sample(4096, torch.Generator().manual_seed(0))
    assert set(start.tolist()) == set(grid.timesteps.tolist())  # every grid point is drawn
    torch.testing.assert_close(end, (start - 20).clamp(min=0))
    assert end.min() == 0
    with pytest.raises(ValueError, match="solver steps"):
        SkippingGrid(0)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_ddim_timesteps_match(spacing, offset):
    sched = DDIMScheduler(**SD_DDIM, timestep_spacing=spacing, steps_offset=offset)
    for n in (1, 2, 3, 4, 7, 8, 25, 50):
        sched.set_timesteps(n)
        assert ddim_timesteps(n, 1000, spacing, offset).tolist() == sched.timesteps.tolist(), (spacing, n)


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_dpm_timesteps_match(spacing, offset):
    schedule = NoiseSchedule.from_config(SD)
    for clip in (-float("inf"), -5.1):
        sched = DPMSolverMultistepScheduler(
            **SD, timestep_spacing=spacing, steps_offset=offset, lambda_min_clipped=clip
        )
        for n in (1, 2, 4, 8, 20, 25):
            sched.set_timesteps(n)
            ours = dpm_solver_timesteps(n, schedule, spacing, offset, clip)
            assert ours.tolist() == sched.timesteps.tolist(), (spacing, clip, n)


# --- single steps and whole loops ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", PTYPES)
def test_lcm_scheduler_loop(ptype, parity):
    """Our multistep consistency sampler against LCMScheduler.step, every intermediate and the result."""
    schedule = NoiseSchedule.from_config(SD)
    for n in range(1, 9):
        sched = LCMScheduler(**SD, prediction_type=ptype)
        sched.set_timesteps(n)
        gens = _generators()
        latents = randn_per_image(SHAPE, gens)
        ref_denoised = []
        for t in sched.timesteps:
            latents, denoised = sched.step(fake_net(latents, t), t, latents, generator=gens, return_dict=False)
            ref_denoised.append(denoised)

        ours_denoised = []

        def f(z, t, ours_denoised=ours_denoised):
            alpha, sigma = schedule.alpha_sigma(t)
            out = consistency_function(
                z, to_denoised(fake_net(z, t), z, alpha, sigma, PredictionType(ptype)).x0, *boundary_scalings(t)
            )
            ours_denoised.append(out)
            return out

        gens = _generators()
        result = sample_lcm(f, randn_per_image(SHAPE, gens), lcm_timesteps(n), schedule, gens)
        for i, (a, b) in enumerate(zip(ours_denoised, ref_denoised, strict=True)):
            parity(a, b, label=f"{ptype}-{n}steps-step{i}")
        parity(result, ref_denoised[-1], label=f"{ptype}-{n}steps")


@pytest.mark.parametrize("ptype", PTYPES)
@pytest.mark.parametrize("spacing,offset,set_alpha_to_one", [("leading", 1, False), ("trailing", 0, True)])
def test_ddim_scheduler_loop(ptype, spacing, offset, set_alpha_to_one, parity):
    config = {**SD_DDIM, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": set_alpha_to_one}
    schedule = NoiseSchedule.from_config(config)
    for n in (1, 2, 4, 8, 25, 50):
        sched = DDIMScheduler(**config, prediction_type=ptype)
        sched.set_timesteps(n)
        z = randn_per_image(SHAPE, _generators())
        # one step() from the same state first, then the whole loop
        t0 = sched.timesteps[0]
        ref_one = sched.step(fake_net(z, t0), t0, z).prev_sample
        if n > 1:  # one step of ours to timesteps[1], which is diffusers' t − T // N for these spacings
            ours_one = _one_ddim_step(schedule, ptype, z, sched.timesteps[0], sched.timesteps[1])
            parity(ours_one, ref_one, label=f"{ptype}-{spacing}-{n}-step")
        ref = z
        for t in sched.timesteps:
            ref = sched.step(fake_net(ref, t), t, ref).prev_sample
        ours = sample_ddim(_denoiser(schedule, ptype), z, ddim_timesteps(n, 1000, spacing, offset), schedule)
        parity(ours, ref, label=f"{ptype}-{spacing}-{n}")


def _one_ddim_step(schedule, ptype, z, s, t):
    from lcm.maths.solvers import ddim_step

    batch = z.shape[0]
    return ddim_step(_denoiser(schedule, ptype), z, s.expand(batch), t.expand(batch), schedule)


@pytest.mark.parametrize("ptype", PTYPES)
@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_dpm_solver_multistep_loop(ptype, algorithm, parity):
    config = {**SD, "timestep_spacing": "linspace"}
    schedule = NoiseSchedule.from_config(config)
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers refuses "zero" for dpmsolver
    for n in (1, 2, 3, 4, 8, 15, 20, 25):
        sched = DPMSolverMultistepScheduler(
            **config, prediction_type=ptype, algorithm_type=algorithm, solver_order=2, final_sigmas_type=final
        )
        sched.set_timesteps(n)
        z = randn_per_image(SHAPE, _generators())
        ref = z
        for t in sched.timesteps:
            ref = sched.step(fake_net(ref, t), t, ref).prev_sample
        timesteps = dpm_solver_timesteps(n, schedule, "linspace")
        ours = sample_dpm_solver(_denoiser(schedule, ptype), z, timesteps, schedule, algorithm == "dpmsolver++")
        parity(ours, ref, label=f"{ptype}-{algorithm}-{n}")
