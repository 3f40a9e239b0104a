"""img2img and TCD against diffusers: our sampler loops and ``lcm.sample`` functions on one side, diffusers' own
schedulers and pipelines (``TCDScheduler``, ``LatentConsistencyModelImg2ImgPipeline``,
``StableDiffusionImg2ImgPipeline``, ``StableDiffusionPipeline`` with TCD) on the other, stepping the same tiny random
UNet / VAE with the same per-image generators. The reference side never calls our code."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from PIL import Image

from lcm.images import image_to_tensor
from lcm.maths.guidance import guidance_scale_from_w
from lcm.maths.parameterization import PredictionType, to_denoised
from lcm.maths.sampling import randn_per_image, sample_tcd
from lcm.maths.schedule import NoiseSchedule
from lcm.maths.timesteps import img2img_start, lcm_timesteps, tcd_intermediate_timesteps
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.sample import Sampler, img2img_latents, sample_latents

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
CTX_DIM, LATENT, BATCH, W = 32, 8, 3, 4.0
SEEDS = [21, 22, 23]
GAMMAS = [0.0, 0.3, 1.0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Networks this small run fastest on one thread (and steadiest when other work shares the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny networks ------------------------------------------------------------------------------------------------
def tiny_unet(w_conditioned: bool, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CTX_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=256 if w_conditioned else None,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """Factor 2 (latents 8² ↔ images 16²); a scaling factor other than 1 so that a missing factor shows."""
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
    ).eval()


def contexts():
    g = torch.Generator().manual_seed(9)
    return torch.randn(BATCH, 5, CTX_DIM, generator=g), torch.randn(BATCH, 5, CTX_DIM, generator=g)


def init_pils(side: int) -> list[Image.Image]:
    """Three different RGB images of the pipeline's size."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(BATCH)]


def gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def ours(pipe) -> LatentDiffusion:
    """Our model around the pipeline's own networks and (possibly pipeline-adjusted) scheduler config."""
    return LatentDiffusion(pipe.unet, pipe.vae, dict(pipe.scheduler.config), text_encoder=None)


def _pipe(cls, unet, scheduler, **extra):
    pipe = cls(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels_of(model: LatentDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Our decoded images mapped to the pipelines' [0, 1] "pt" output."""
    return (model.decode(latents) + 1) / 2


# --- TCD: timesteps and the scheduler loop -------------------------------------------------------------------------
def fake_net(z: torch.Tensor, t) -> torch.Tensor:
    """A smooth, t-dependent stand-in for a UNet, identical in both loops."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.6 * z + 0.3 * torch.sin(1.7 * z + t / 250.0)


def test_tcd_timesteps_are_tcd_schedulers():
    """TCDScheduler's default schedule (config original_inference_steps = 50) is LCMScheduler's, strength included."""
    sched = TCDScheduler(**SD)
    for n in range(1, 9):
        for strength in (1.0, 0.5):
            sched.set_timesteps(n, strength=strength)
            assert lcm_timesteps(n, 50, 1000, strength).tolist() == sched.timesteps.tolist(), (n, strength)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_tcd_intermediate_timesteps_are_the_schedulers(gamma):
    """s_i read back from TCDScheduler.step itself: with an ε-prediction of 0, ``pred_noised_sample`` is
    √(ᾱ_s/ᾱ_t)·z, so ᾱ_s identifies s."""
    sched = TCDScheduler(**SD)
    ac = sched.alphas_cumprod
    for n in (1, 2, 3, 4, 7, 8):
        sched.set_timesteps(n)
        z = torch.ones(1, 1, 1, 1)
        found = []
        for t in sched.timesteps:
            _, noised = sched.step(torch.zeros_like(z), t, z, eta=gamma, return_dict=False)
            alpha_s = float(noised.flatten()[0]) ** 2 * float(ac[t])
            found.append(int((ac - alpha_s).abs().argmin()))
        assert tcd_intermediate_timesteps(sched.timesteps, gamma).tolist() == found, (gamma, n)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_tcd_scheduler_loop(ptype, parity):
    """Our TCD loop against TCDScheduler.step at γ = 0, 0.3, 1 and 1…8 steps, every draw from the same generators."""
    schedule = NoiseSchedule.from_config(SD)
    shape = (BATCH, 4, 8, 8)

    def denoise(z, t):
        alpha, sigma = schedule.alpha_sigma_at(t)
        return to_denoised(fake_net(z, t), z, alpha, sigma, PredictionType(ptype))

    for gamma in GAMMAS:
        for n in range(1, 9):
            sched = TCDScheduler(**SD, prediction_type=ptype)
            sched.set_timesteps(n)
            g = gens()
            ref = randn_per_image(shape, g)
            for t in sched.timesteps:
                ref = sched.step(fake_net(ref, t), t, ref, eta=gamma, generator=g, return_dict=False)[0]
            g = gens()
            result = sample_tcd(denoise, randn_per_image(shape, g), lcm_timesteps(n), schedule, gamma, g)
            parity(result, ref, label=f"{ptype}-gamma{gamma}-{n}steps")


# --- TCD end to end ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_tcd_equals_stable_diffusion_pipeline_with_tcd_scheduler(ptype, parity):
    """``sample_latents(Sampler.TCD)`` against StableDiffusionPipeline + TCDScheduler (eta = γ) on a w-conditioned
    UNet (the pipeline then passes the w-embedding and runs no CFG), latents to float32 precision."""
    cond, _ = contexts()
    pipe = _pipe(StableDiffusionPipeline, tiny_unet(True), TCDScheduler(**SD, prediction_type=ptype))
    model = ours(pipe)
    side = LATENT * pipe.vae_scale_factor
    for gamma in GAMMAS:
        for steps in (1, 2, 4, 8):
            ref = pipe(
                prompt_embeds=cond,
                num_inference_steps=steps,
                guidance_scale=guidance_scale_from_w(W),
                eta=gamma,
                height=side,
                width=side,
                generator=gens(),
                output_type="latent",
            ).images
            mine = sample_latents(model, TextEmbeddings(cond), None, Sampler.TCD, steps, W, SEEDS, gamma=gamma)
            parity(mine, ref, label=f"{ptype}-gamma{gamma}-{steps}steps")


# --- img2img -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_lcm_img2img_equals_lcm_img2img_pipeline(ptype, parity):
    """``img2img_latents(Sampler.LCM)`` against LatentConsistencyModelImg2ImgPipeline: posterior sample, noising to
    the first timestep and the LCM loop, latents and decoded pixels."""
    cond, _ = contexts()
    pipe = _pipe(LatentConsistencyModelImg2ImgPipeline, tiny_unet(True), LCMScheduler(**SD, prediction_type=ptype))
    model = ours(pipe)
    pils = init_pils(LATENT * pipe.vae_scale_factor)
    images = torch.cat([image_to_tensor(p) for p in pils])
    for steps, strength in ((1, 0.5), (2, 0.6), (4, 0.3), (4, 1.0), (8, 0.8)):
        kwargs = dict(prompt_embeds=cond, image=pils, num_inference_steps=steps, strength=strength)
        kwargs.update(guidance_scale=guidance_scale_from_w(W))
        ref = pipe(**kwargs, generator=gens(), output_type="latent").images
        mine = img2img_latents(model, images, strength, TextEmbeddings(cond), None, Sampler.LCM, steps, W, SEEDS)
        parity(mine, ref, label=f"{ptype}-{steps}steps-strength{strength}")
        if steps == 4:
            ref_pixels = pipe(**kwargs, generator=gens(), output_type="pt").images
            parity(pixels_of(model, mine), ref_pixels, label=f"{ptype}-{steps}steps-strength{strength}-pixels")


TEACHER_SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "dpmpp": lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", steps_offset=1),
    "dpm": lambda: DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", steps_offset=1
    ),
}


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "dpmpp"])
def test_teacher_img2img_equals_stable_diffusion_img2img_pipeline(sampler, parity):
    """Teacher img2img with CFG against a negative prompt: StableDiffusionImg2ImgPipeline (its strength cut of the
    schedule, ``negative_prompt_embeds``, guidance_scale = w + 1) against ``img2img_latents``. 20 steps at
    strength 0.5 run 10 steps of a 20-step DPM-Solver schedule, whose last step stays 2nd order (≥ 15 steps)."""
    cond, negative = contexts()
    pipe = _pipe(StableDiffusionImg2ImgPipeline, tiny_unet(False), TEACHER_SCHEDULERS[sampler](), image_encoder=None)
    model = ours(pipe)
    pils = init_pils(LATENT * pipe.vae_scale_factor)
    images = torch.cat([image_to_tensor(p) for p in pils])
    for steps, strength in ((4, 0.5), (5, 0.9), (20, 0.5)):
        kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=negative, image=pils, strength=strength)
        kwargs.update(num_inference_steps=steps, guidance_scale=guidance_scale_from_w(W))
        ref = pipe(**kwargs, generator=gens(), output_type="latent").images
        mine = img2img_latents(  # the pipeline's scheduler keeps its config's spacing: "config"
            model, images, strength, TextEmbeddings(cond), TextEmbeddings(negative), Sampler(sampler), steps, W, SEEDS,
            "config",
        )  # fmt: skip
        parity(mine, ref, label=f"{sampler}-{steps}steps-strength{strength}")
        if steps == 4:
            ref_pixels = pipe(**kwargs, generator=gens(), output_type="pt").images
            parity(pixels_of(model, mine), ref_pixels, label=f"{sampler}-{steps}steps-pixels")


@pytest.mark.parametrize("gamma", GAMMAS)
def test_tcd_img2img_equals_stable_diffusion_img2img_pipeline_with_tcd(gamma, parity):
    """TCD img2img: StableDiffusionImg2ImgPipeline + TCDScheduler (eta = γ) on a w-conditioned UNet."""
    cond, _ = contexts()
    pipe = _pipe(StableDiffusionImg2ImgPipeline, tiny_unet(True), TCDScheduler(**SD), image_encoder=None)
    model = ours(pipe)
    pils = init_pils(LATENT * pipe.vae_scale_factor)
    images = torch.cat([image_to_tensor(p) for p in pils])
    for steps, strength in ((4, 0.5), (4, 0.75), (8, 0.6)):
        kwargs = dict(prompt_embeds=cond, image=pils, strength=strength, num_inference_steps=steps, eta=gamma)
        ref = pipe(**kwargs, guidance_scale=guidance_scale_from_w(W), generator=gens(), output_type="latent").images
        mine = img2img_latents(
            model, images, strength, TextEmbeddings(cond), None, Sampler.TCD, steps, W, SEEDS, gamma=gamma
        )
        parity(mine, ref, label=f"gamma{gamma}-{steps}steps-strength{strength}")


def test_strength_cut_is_the_pipelines():
    """``img2img_start`` against StableDiffusionImg2ImgPipeline.get_timesteps, and its one-line refusal."""
    pipe = _pipe(StableDiffusionImg2ImgPipeline, tiny_unet(False), TEACHER_SCHEDULERS["ddim"](), image_encoder=None)
    for n in (1, 2, 4, 7, 25):
        pipe.scheduler.set_timesteps(n)
        for strength in (0.05, 0.3, 0.5, 0.61, 0.99, 1.0):
            ts, kept = pipe.get_timesteps(n, strength, "cpu")
            if kept == 0:
                with pytest.raises(ValueError, match="runs int"):
                    img2img_start(n, strength)
            else:
                assert img2img_start(n, strength) == n - kept and len(ts) == kept, (n, strength)
