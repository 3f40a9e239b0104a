"""Flow-matching teachers (SD3 class): the schedule, the samplers and LCD's pieces against diffusers' flow schedulers
and ``StableDiffusion3Pipeline`` (independent references), and against closed forms."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lcm.maths.parameterization import Denoised, PredictionType, to_denoised, to_model_output
from lcm.maths.schedule import FlowSchedule, schedule_from_config
from lcm.maths.solvers import Solver, solve
from lcm.maths.timesteps import FlowGrid, Sampler, flow_timesteps, flow_trailing_timesteps, sampler_timesteps
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.sample import sample_latents
from tiny_models import build_tiny_flow, build_tiny_sd3

TEXT_DIM = 32


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    return build_tiny_flow(tmp_path_factory.mktemp("tiny-flow"), shift=3.0, text_dim=TEXT_DIM)


@pytest.fixture(scope="module")
def flow_model(flow_folder):
    return LatentDiffusion.from_pretrained(flow_folder, with_text_encoder=False)


def _text(batch: int, seed: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(torch.randn(batch, 5, TEXT_DIM, generator=g), torch.randn(batch, TEXT_DIM, generator=g))


def _sd3_pipeline(model: LatentDiffusion, scheduler):
    from diffusers import StableDiffusion3Pipeline

    none = dict.fromkeys(
        ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    )
    return StableDiffusion3Pipeline(transformer=model.unet, scheduler=scheduler, vae=model.vae, **none)


def _pipeline_latents(pipe, cond: TextEmbeddings, uncond: TextEmbeddings, z: torch.Tensor, **kwargs):
    side = z.shape[-1] * pipe.vae_scale_factor
    out = pipe(
        prompt_embeds=cond.hidden_states,
        pooled_prompt_embeds=cond.pooled,
        negative_prompt_embeds=uncond.hidden_states,
        negative_pooled_prompt_embeds=uncond.pooled,
        latents=z.clone(),
        height=side,
        width=side,
        output_type="latent",
        **kwargs,
    )
    return out.images


# --- the schedule -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 25])
def test_flow_timesteps_match_flow_match_euler(shift, steps, parity):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    ours = flow_timesteps(steps, FlowSchedule(shift=shift))
    parity(ours, reference.timesteps, 1e-6, f"shift {shift}, {steps} steps")
    sigmas = FlowSchedule(shift=shift).sigma(ours)
    parity(torch.cat([sigmas, sigmas.new_zeros(1)]), reference.sigmas, 1e-6, f"sigmas, shift {shift}")


@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_dynamic_shift_matches_flux_rule(seq_len, parity):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "_class_name": "FlowMatchEuler"}
    schedule = schedule_from_config(config)
    reference = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k != "_class_name"})
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert schedule.mu(seq_len) == pytest.approx(mu, rel=1e-12)
    reference.set_timesteps(4, mu=mu)
    parity(flow_timesteps(4, schedule, seq_len), reference.timesteps, 1e-6, f"{seq_len} tokens")


def test_flow_forward_process_and_conversions():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowSchedule(shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = reference.timesteps
    torch.testing.assert_close(schedule.add_noise(x0, eps, t.double()), reference.scale_noise(x0, t, eps))
    # the velocity ε − x0 converts back to the pair exactly (up to rounding) at every σ, the clean end included
    t = torch.tensor([0.0, 1.0, 250.0, 999.0, 1000.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    x0, eps = x0[:1].expand(5, -1, -1, -1), eps[:1].expand(5, -1, -1, -1)
    z = schedule.add_noise(x0, eps, t)
    v = to_model_output(x0, eps, alpha, sigma, PredictionType.FLOW)
    torch.testing.assert_close(v, eps - x0)
    d = to_denoised(v, z, alpha, sigma, PredictionType.FLOW)
    torch.testing.assert_close(d.x0, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.eps, eps, atol=1e-5, rtol=0)
    # λ and its inverse
    inner = torch.tensor([1.0, 100.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_of_lambda(schedule.lambda_(inner)), inner)


def test_flow_schedule_refusals():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        FlowSchedule().alpha_sigma(torch.tensor([1001.0]))
    schedule = FlowSchedule()
    with pytest.raises(ValueError, match="ddim \\(Euler\\), heun or lcm"):
        sampler_timesteps(Sampler.DPM_SOLVER_PP_2M, 4, {}, schedule)
    with pytest.raises(ValueError, match="img2img"):
        sampler_timesteps(Sampler.LCM, 4, {}, schedule, strength=0.5)


# --- sampling against StableDiffusion3Pipeline --------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["config", "trailing"])
@pytest.mark.parametrize("steps", [1, 4])
def test_euler_sampler_matches_sd3_pipeline(flow_model, steps, spacing, parity):
    """Euler (the ddim sampler) on the scheduler's own timesteps ("config": what the SD3 pipeline does by default)
    and on the trailing ones (every step a jump: the pipeline given those σ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, seeds, w = flow_model, [3, 4], 2.0
    cond, uncond = _text(2, 0), _text(2, 1)
    ours = sample_latents(model, cond, uncond, Sampler.DDIM, steps, w, seeds, timestep_spacing=spacing)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.cat([torch.randn(1, *model.latent_shape, generator=g) for g in gens])
    pipe = _sd3_pipeline(model, FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config))
    sigmas = {"sigmas": [1 - i / steps for i in range(steps)]} if spacing == "trailing" else {}
    # diffusers' guidance_scale is 1 + w (docs/design.md §1)
    ref = _pipeline_latents(pipe, cond, uncond, z, num_inference_steps=steps, guidance_scale=1 + w, **sigmas)
    parity(ours, ref, 1e-5, f"{spacing}, {steps} steps")


def test_heun_sampler_matches_flow_match_heun(flow_model, parity):
    from diffusers import FlowMatchHeunDiscreteScheduler

    model, seeds, w = flow_model, [5], 1.5
    cond, uncond = _text(1, 2), _text(1, 3)
    ours = sample_latents(model, cond, uncond, Sampler.HEUN, 3, w, seeds, timestep_spacing="config")
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    pipe = _sd3_pipeline(model, FlowMatchHeunDiscreteScheduler.from_config(model.scheduler_config))
    ref = _pipeline_latents(pipe, cond, uncond, z, num_inference_steps=3, guidance_scale=1 + w)
    parity(ours, ref, 1e-5, "3 steps")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_matches_flow_match_lcm(flow_model, steps, parity):
    """A flow LCM's multistep sampling against ``FlowMatchLCMScheduler`` in the SD3 pipeline, on the timesteps lcm
    uses (given to the pipeline as ``sigmas``), the re-noising drawn from the same per-image generators."""
    from diffusers import FlowMatchLCMScheduler

    from lcm.models.formats import flow_lcm_scheduler_config

    config = flow_lcm_scheduler_config(flow_model.scheduler_config)
    lcm = flow_model.with_network(flow_model.unet, config)
    assert lcm.is_lcm and lcm.default_sampler is Sampler.LCM
    seeds, cond = [7, 8], _text(2, 4)
    ours = sample_latents(lcm, cond, None, Sampler.LCM, steps, 0.0, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.cat([torch.randn(1, *lcm.latent_shape, generator=g) for g in gens])  # the first draw of each
    scheduler = FlowMatchLCMScheduler.from_config(config)
    scheduler.step = functools.partial(scheduler.step, generator=gens)  # the pipeline passes none
    pipe = _sd3_pipeline(lcm, scheduler)
    u = [1 - i / steps for i in range(steps)]  # unshifted: the scheduler shifts them
    ref = _pipeline_latents(pipe, cond, cond, z, sigmas=u, guidance_scale=1.0)
    parity(ours, ref, 1e-5, f"{steps} steps")
    torch.testing.assert_close(
        flow_trailing_timesteps(steps, lcm.schedule), scheduler.timesteps.double(), rtol=1e-6, atol=1e-4
    )


def test_flow_consistency_output_is_the_clean_estimate(flow_model):
    """f(z, t) = x̂0 = z − σ·v̂ for a flow model, so f(z, 0) = z exactly: the boundary condition."""
    model, text = flow_model, _text(2, 5)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 600.0])
    out = model.consistency_output(z, t, text, None)
    assert torch.equal(out[0], z[0])
    with torch.no_grad():
        v = model.unet_output(z, t, text).float()
    torch.testing.assert_close(out[1], z[1] - 0.6 * v[1])
    # the sampler's host-float path (one compiled-step-ready graph) agrees with the per-sample path
    host = model.consistency_output(z, 600.0, text, None)
    torch.testing.assert_close(host[1], out[1])


# --- LCD's pieces -------------------------------------------------------------------------------------------------
def test_flow_grid_pairs_are_one_step_apart_in_unshifted_time():
    schedule, n = FlowSchedule(shift=3.0), 20
    start, end = FlowGrid(n, schedule).sample(4096, torch.Generator().manual_seed(0))

    def unshift(t):  # inverse of s·u / (1 + (s − 1)·u)
        sigma = t / 1000
        return sigma / (3.0 - 2.0 * sigma)

    assert bool((end < start).all()) and bool((end >= 0).all()) and bool((start <= 1000).all())
    gap = unshift(start) - unshift(end)
    torch.testing.assert_close(gap, torch.full_like(gap, 1 / n), rtol=0, atol=1e-9)
    # every σ is trained: the starts cover [1/N, 1] in unshifted time, not a fixed grid
    assert len(torch.unique(start)) == 4096
    assert unshift(start).min() < 1 / n + 0.01 and unshift(start).max() > 0.99


def test_heun_solver_against_the_exact_flow_of_gaussian_data():
    """For x0 ~ N(0, c²) the exact denoiser is linear and the ODE's solution known in closed form: the marginal std
    ``s(σ) = √((1 − σ)²c² + σ²)`` scales z. Heun's one-step error is of the third order in the step, Euler's of the
    second."""
    schedule, c = FlowSchedule(), 0.5

    def denoiser(z, t):
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        x0 = alpha * c**2 / (alpha**2 * c**2 + sigma**2) * z  # E[x0 | z]
        return Denoised(x0, (z - alpha * x0) / sigma)

    z = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = lambda tt: math.sqrt((1 - tt / 1000) ** 2 * c**2 + (tt / 1000) ** 2)  # noqa: E731
    s = torch.tensor([600.0], dtype=torch.float64)

    def errors(end: float) -> tuple[float, float]:
        t, exact = torch.tensor([end], dtype=torch.float64), z * std(end) / std(600.0)
        return tuple((solve(solver, denoiser, z, s, t, schedule) - exact).abs().max().item() for solver in solvers)

    solvers = (Solver.DDIM, Solver.HEUN)
    (euler_h, heun_h), (euler_half, heun_half) = errors(400.0), errors(500.0)
    # one step's (local) error: O(h²) for Euler, O(h³) for Heun, so halving h divides it by about 4 and 8
    assert 3.0 < euler_h / euler_half < 6.0, (euler_h, euler_half)
    assert 6.0 < heun_h / heun_half < 12.0, (heun_h, heun_half)
    assert heun_h < 0.5 * euler_h
    # ending at σ = 0 it stays Euler (diffusers' last step), which lands on x̂0
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(solve(Solver.HEUN, denoiser, z, s, zero, schedule), denoiser(z, s).x0)


def test_heun_refused_for_vp_teachers(tiny_sd):
    model = LatentDiffusion.from_pretrained(tiny_sd, with_text_encoder=False)
    z = torch.zeros(1, *model.latent_shape)
    with pytest.raises(ValueError, match="flow-matching"):
        solve(Solver.HEUN, model.denoiser(_text(1, 0)), z, torch.tensor([500]), torch.tensor([400]), model.schedule)
    with pytest.raises(ValueError, match="flow-matching"):
        sampler_timesteps(Sampler.HEUN, 4, model.scheduler_config, model.schedule)


# --- distillation end to end: exports that diffusers' SD3 pipeline samples -------------------------------------
PROMPTS, SEEDS = ["a photo of a cat 1", "a photo of a cat 2"], [3, 4]


def _sd3_from_folder(folder, transformer=None):
    from diffusers import AutoencoderKL, FlowMatchLCMScheduler, SD3Transformer2DModel

    parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer or SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
        scheduler=FlowMatchLCMScheduler.from_pretrained(folder, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        **dict.fromkeys(parts),
    )


def _pipeline_lcm(pipe, model: LatentDiffusion, steps: int) -> torch.Tensor:
    """The pipeline's 2-image LCM sample of PROMPTS on lcm's timesteps, re-noised from the per-image generators."""
    cond = model.encode_prompts(PROMPTS)
    cond = TextEmbeddings(cond.hidden_states, cond.pooled_or_mean())
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    z = torch.cat([torch.randn(1, *model.latent_shape, generator=g) for g in gens])
    pipe.scheduler.step = functools.partial(pipe.scheduler.step, generator=gens)
    pipe.set_progress_bar_config(disable=True)
    u = [1 - i / steps for i in range(steps)]
    return _pipeline_latents(pipe, cond, cond, z, sigmas=u, guidance_scale=1.0)


def _distill(teacher, data, out, *extra):
    from lcm.cli import main

    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--batch-size", "4"]
    args += ["--max-steps", "3", "--learning-rate", "1e-3", "--w-min", "2", "--w-max", "2", "--validate-every", "0"]
    assert main([*args, *extra]) == 0
    model = LatentDiffusion.from_pretrained(out)
    assert model.is_lcm and model.is_flow and model.default_sampler is Sampler.LCM
    return model


def test_sd3_text_encoder_matches_the_pipeline(tmp_path):
    """Two CLIPs and (absent) T5 combined as StableDiffusion3Pipeline.encode_prompt combines them."""
    from diffusers import StableDiffusion3Pipeline

    folder = build_tiny_sd3(tmp_path / "sd3")
    ours = LatentDiffusion.from_pretrained(folder).encode_prompts(["a photo of a cat", ""])
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            ["a photo of a cat", ""], None, None, do_classifier_free_guidance=False
        )
    assert ours.hidden_states.shape == (2, 77 + 256, 96)
    torch.testing.assert_close(ours.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_sd3_full_export_loads_and_samples_in_the_sd3_pipeline(captioned_images, tmp_path, parity):
    """lcm distill of an SD3 folder (text encoders and model index included): the SD3 pipeline's from_pretrained
    loads the export with FlowMatchLCMScheduler at the teacher's shift and samples, from the prompts, what lcm
    samples."""
    from diffusers import StableDiffusion3Pipeline

    teacher = build_tiny_sd3(tmp_path / "teacher", shift=3.0)
    ours_model = _distill(teacher, captioned_images, tmp_path / "lcm", "--solver", "heun")
    ours = sample_latents(ours_model, ours_model.encode_prompts(PROMPTS), None, Sampler.LCM, 2, 0.0, SEEDS)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "lcm", text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler" and pipe.scheduler.config.shift == 3.0
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    pipe.scheduler.step = functools.partial(pipe.scheduler.step, generator=gens)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, sigmas=[1.0, 0.5], guidance_scale=1.0, generator=gens, output_type="latent").images
    parity(ours, ref, 1e-5, "full")
    images = ours_model.decode(ours)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_flow_lora_export_loads_with_load_lora_weights(captioned_images, tmp_path, parity):
    """A flow LCM-LoRA: every adapted module arrives through SD3's load_lora_weights, and the pipeline then samples
    what lcm samples from the LoRA folder; the distillation changed the network (the bare teacher differs)."""
    from diffusers import FlowMatchLCMScheduler

    from lcm.models.lora import adapted_modules
    from lcm.models.student import add_lora

    teacher = build_tiny_flow(tmp_path / "teacher", shift=3.0, text_dim=384)
    out = tmp_path / "lora"
    ours_model = _distill(teacher, captioned_images, out, "--student", "lora", "--lora-rank", "4", "--solver", "dpmpp")
    ours = sample_latents(ours_model, ours_model.encode_prompts(PROMPTS), None, Sampler.LCM, 2, 0.0, SEEDS)
    pipe = _sd3_from_folder(teacher)
    pipe.scheduler = FlowMatchLCMScheduler.from_config({**pipe.scheduler.config, "shift": 3.0})
    pipe.load_lora_weights(out)
    fresh = add_lora(LatentDiffusion.from_pretrained(teacher, with_text_encoder=False).unet, rank=4)
    assert set(adapted_modules(pipe.transformer)) == set(adapted_modules(fresh)) != set()
    ref = _pipeline_lcm(pipe, ours_model, 2)
    parity(ours, ref, 1e-5, "lora")
    bare = _pipeline_lcm(_sd3_from_folder(teacher), ours_model, 2)
    assert (bare - ref).abs().max() > 1e-4


# --- the LCD step for a flow teacher, against a hand-written reference -------------------------------------------
def _perturb(network, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("solver", [Solver.DDIM, Solver.HEUN, Solver.DPM_SOLVER_PP_2S])
def test_flow_lcd_step_equals_hand_computed_reference(flow_model, solver):
    """One LCD loss of a flow teacher written out by hand: pairs (u, u − 1/N) through SD3's shift, z = (1 − σ)·x0
    + σ·ε, the student's f = z − σ·v, the guided teacher's Euler / Heun step in σ (DPM-Solver++(2S): the library's
    solver on the flow's λ, checked by its own tests), the target's f at the pair's end, pseudo-Huber."""
    import copy

    from lcm.config.method import LCDConfig
    from lcm.config.run import StudentKind
    from lcm.models.student import full_student
    from lcm.training.lcd import LCD

    model, n, w_value, c = flow_model, 20, 2.5, 0.01
    student = full_student(model.unet)
    _perturb(student, 1)
    target = copy.deepcopy(student)
    _perturb(target, 2)
    cfg = LCDConfig(num_solver_steps=n, solver=solver, w_min=w_value, w_max=w_value, huber_c=c)
    lcd = LCD(model, student, StudentKind.FULL, cfg, target)
    z0 = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, uncond = _text(3, 10), _text(3, 11)
    ours = lcd.loss(z0, cond, uncond, torch.Generator().manual_seed(7)).loss

    g = torch.Generator().manual_seed(7)  # the step's draws, in its order: pairs, noise, w
    u = 1 / n + (1 - 1 / n) * torch.rand(3, generator=g, dtype=torch.float64)
    noise = torch.randn(z0.shape, generator=g)
    torch.rand(3, generator=g)  # w ~ U[w, w]
    shift = lambda v: 3.0 * v / (1 + 2.0 * v)  # noqa: E731  the folder's shift 3
    s_start, s_end = shift(u), shift((u - 1 / n).clamp(min=0))

    def v(net, z, sigma, text):
        t = (1000 * sigma).float()
        return net(
            hidden_states=z, encoder_hidden_states=text.hidden_states, pooled_projections=text.pooled, timestep=t
        )[0]

    def guided(z, sigma):
        vc, vu = v(model.unet, z, sigma, cond), v(model.unet, z, sigma, uncond)
        return vc + w_value * (vc - vu)

    col = lambda x: x.float().view(-1, 1, 1, 1)  # noqa: E731
    z = col(1 - s_start) * z0 + col(s_start) * noise
    prediction = z - col(s_start) * v(student, z, s_start, cond)
    with torch.no_grad():
        v1 = guided(z, s_start)
        euler = z + col(s_end - s_start) * v1
        if solver is Solver.DDIM:
            z_end = euler
        elif solver is Solver.HEUN:
            heun = z + col(s_end - s_start) * 0.5 * (v1 + guided(euler, s_end))
            z_end = torch.where(col(s_end) > 0, heun, euler)
        else:
            z_end = solve(solver, model.guided_denoiser(cond, uncond, torch.full((3,), w_value)), z, 1000 * s_start,
                          1000 * s_end, model.schedule)  # fmt: skip
        target_out = z_end - col(s_end) * v(target, z_end, s_end, cond)
    reference = (torch.sqrt((prediction - target_out) ** 2 + c**2) - c).flatten(1).mean(1)
    torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-7)


def test_flow_lcd_refuses_what_it_does_not_have(flow_model, tiny_sd):
    from lcm.config.method import Consistency, LCDConfig
    from lcm.config.run import StudentKind
    from lcm.models.student import full_student
    from lcm.training.lcd import LCD

    student = full_student(flow_model.unet)
    for cfg, message in [
        (LCDConfig(consistency=Consistency.TCD), "not built for flow"),
        (LCDConfig(adversarial_weight=0.1), "--adversarial-weight is not built for flow"),
        (LCDConfig(dmd_weight=1.0), "--dmd-weight is not built for flow"),
        (LCDConfig(cfg_free=True), "--cfg-free is not built for flow"),
        (LCDConfig(timestep_bias=1.0), "every σ"),
        (LCDConfig(solver=Solver.DPM_SOLVER_2), "cannot reach"),
    ]:
        with pytest.raises(ValueError, match=message):
            LCD(flow_model, student, StudentKind.FULL, cfg, student)
    vp = LatentDiffusion.from_pretrained(tiny_sd, with_text_encoder=False)
    with pytest.raises(ValueError, match="for flow-matching teachers"):
        LCD(vp, full_student(vp.unet), StudentKind.FULL, LCDConfig(solver=Solver.HEUN), full_student(vp.unet))


def test_flow_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    """A flow student's weights and EMA target after a crash and --resume latest equal an uninterrupted run's."""
    from lcm.config import LoopConfig, OptimConfig, StudentConfig
    from lcm.config.method import LCDConfig
    from lcm.data.loader import batch_stream
    from lcm.data.sources import collate_skip_none
    from lcm.training.loop import train
    from lcm.training.task import DistillTask

    folder = build_tiny_flow(tmp_path / "teacher", shift=3.0, text_dim=384)
    g = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.rand(3, 64, 64, generator=g) * 2 - 1, "caption": f"a cat {i % 3}"} for i in range(16)
    ]

    def run(out, crash_after=None, resume=None):
        task = DistillTask(LatentDiffusion.from_pretrained(folder), LCDConfig(solver=Solver.HEUN), StudentConfig())

        def batches(start):
            for i, batch in enumerate(batch_stream(data, 4, collate_skip_none, seed=0, start=start)):
                if i == crash_after:
                    return  # the stream ends early: the process "dies" between steps
                yield batch

        loop = LoopConfig(max_steps=4, checkpoint_every=2, validate_every=0, seed=5)
        if crash_after is None:
            train(task, batches, out, loop, OptimConfig(learning_rate=1e-3), resume)
        else:
            with pytest.raises(Exception):  # noqa: B017, PT011  whatever the loop says of a stream that ended early
                train(task, batches, out, loop, OptimConfig(learning_rate=1e-3), resume)
        return task.state_dict()

    straight = run(tmp_path / "a")
    run(tmp_path / "b", crash_after=3)
    assert (tmp_path / "b" / "train" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "b" / "train" / "checkpoints" / "step-4").exists()
    resumed = run(tmp_path / "b", resume="latest")
    assert straight.keys() == resumed.keys() and any(k.startswith("target.") for k in straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


# --- Flux: packed latents, rotary ids, a guidance-distilled teacher ----------------------------------------------
def _flux_pack(z: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def _flux_unpack(packed: torch.Tensor, side: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, side, side, 8)


def _flux_sample(pipe, cond: TextEmbeddings, z: torch.Tensor, **kwargs) -> torch.Tensor:
    side = z.shape[-1] * 8
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=cond.hidden_states,
        pooled_prompt_embeds=cond.pooled,
        latents=_flux_pack(z.clone()),
        height=side,
        width=side,
        output_type="latent",
        **kwargs,
    )
    return _flux_unpack(out.images, side)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from tiny_models import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


def test_flux_text_encoder_matches_the_pipeline(flux_folder):
    """T5's states as the context and CLIP's pooled output, as FluxPipeline.encode_prompt makes them."""
    from diffusers import FluxPipeline

    model = LatentDiffusion.from_pretrained(flux_folder)
    assert model.is_flow and model.schedule.dynamic_shift and model.latent_shape == (4, 8, 8)
    ours = model.encode_prompts(["a photo of a cat", ""])
    pipe = FluxPipeline.from_pretrained(flux_folder)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(["a photo of a cat", ""], None)
    assert ours.hidden_states.shape == (2, 512, 32)
    torch.testing.assert_close(ours.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_euler_matches_flux_pipeline(flux_folder, steps, parity):
    """The guidance-distilled teacher sampled with Euler: one call per step with guidance 1 + w (no CFG), the
    dynamic shift at the image's token count, Flux's σ spacing (lcm's trailing rule), packed 2×2 patches."""
    from diffusers import FluxPipeline

    model = LatentDiffusion.from_pretrained(flux_folder)
    cond, seeds, w = model.encode_prompts(PROMPTS), SEEDS, 2.5
    ours = sample_latents(model, cond, None, Sampler.DDIM, steps, w, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.cat([torch.randn(1, *model.latent_shape, generator=g) for g in gens])
    ref = _flux_sample(
        FluxPipeline.from_pretrained(flux_folder), cond, z, num_inference_steps=steps, guidance_scale=1 + w
    )
    parity(ours, ref, 1e-5, f"{steps} steps")


@pytest.mark.parametrize("student", ["full", "lora"])
def test_flux_distill_export_samples_in_the_flux_pipeline(student, flux_folder, captioned_images, tmp_path, parity):
    """lcm distill of a guidance-distilled Flux: the student takes w through Flux's own guidance input (a w range,
    not one w), the teacher is guided by it (one call); FluxPipeline.from_pretrained loads the export with
    FlowMatchLCMScheduler (dynamic shift kept), or load_lora_weights the LoRA (every adapter), and samples what lcm
    samples, at two w."""
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    from lcm.cli import main
    from lcm.models.lora import adapted_modules
    from lcm.models.student import add_lora

    out = tmp_path / "lcm"
    args = ["distill", "--teacher", str(flux_folder), "--data", str(captioned_images), "--out", str(out)]
    args += ["--batch-size", "4", "--max-steps", "3", "--learning-rate", "1e-3", "--w-min", "1", "--w-max", "4"]
    args += ["--validate-every", "0", "--solver", "heun", "--student", student, "--lora-rank", "4"]
    assert main(args) == 0
    model = LatentDiffusion.from_pretrained(out)
    assert model.is_lcm and model.w_range == (1.0, 4.0)
    if student == "full":
        pipe = FluxPipeline.from_pretrained(out)
        assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler" and pipe.scheduler.config.use_dynamic_shifting
    else:
        pipe = FluxPipeline.from_pretrained(flux_folder)
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(out)
        fresh = add_lora(LatentDiffusion.from_pretrained(flux_folder, with_text_encoder=False).unet, rank=4)
        assert set(adapted_modules(pipe.transformer)) == set(adapted_modules(fresh)) != set()
    cond = model.encode_prompts(PROMPTS)
    results = []
    for w in (1.0, 3.0):
        ours = sample_latents(model, cond, None, Sampler.LCM, 2, w, SEEDS)
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        z = torch.cat([torch.randn(1, *model.latent_shape, generator=g) for g in gens])
        pipe.scheduler.step = functools.partial(type(pipe.scheduler).step, pipe.scheduler, generator=gens)
        ref = _flux_sample(pipe, cond, z, num_inference_steps=2, guidance_scale=1 + w)
        parity(ours, ref, 1e-5, f"{student}, w {w}")
        results.append(ours)
    assert (results[0] - results[1]).abs().max() > 1e-6  # w reaches the student


def test_lcm_serve_and_lcm_sample_draw_a_flow_lcm(tmp_path):
    """The shipped flow teacher as a flow LCM (its scheduler made FlowMatchLCMScheduler): lcm serve's HTTP API and
    lcm sample draw what the library draws, seed by seed."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import base64
    import io

    import numpy as np
    from PIL import Image

    from lcm.cli import main
    from lcm.images import to_uint8
    from lcm.models.formats import flow_lcm_scheduler_config
    from lcm.sample import generate
    from lcm.serve import Engine, create_app
    from lcm.shipped import flow_teacher_path
    from serve_client import local_client

    teacher = LatentDiffusion.from_pretrained(flow_teacher_path())
    lcm = teacher.with_network(teacher.unet, flow_lcm_scheduler_config(teacher.scheduler_config))
    prompt = "a photo of a sneaker"
    with torch.no_grad():
        expected = to_uint8(generate(lcm, [prompt] * 2, Sampler.LCM, 2, 3.0, [3, 4]))[..., 0]
    with local_client(create_app(Engine(lcm))) as client:
        body = client.post("/api/generate", json={"prompt": prompt, "steps": 2, "seed": 3, "batch": 2}).json()
    assert body["type"] == "image" and body["sampler"] == "lcm", body
    for data_url, want in zip(body["images"], expected, strict=True):
        with Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))) as img:
            np.testing.assert_array_equal(np.asarray(img), want)
    # lcm sample on the teacher folder: Heun, the flow-only sampler, through the CLI
    out = tmp_path / "heun"
    args = ["sample", "--model", str(flow_teacher_path()), "--prompt", prompt, "--sampler", "heun", "--steps", "3"]
    assert main([*args, "--num-images", "1", "--out", str(out)]) == 0
    with torch.no_grad():
        want = to_uint8(generate(teacher, [prompt], Sampler.HEUN, 3, 3.0, [0]))[0, ..., 0]
    with Image.open(next(out.iterdir())) as img:
        np.testing.assert_array_equal(np.asarray(img), want)
