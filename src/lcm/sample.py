"""Images with any model folder: the LCM and TCD samplers for LCMs, DDIM / DPM-Solver / DPM-Solver++ for teachers;
text-to-image, image-to-image and inpainting (docs/sampling.md).

Randomness, one generator per image seed, so that image i is the same whatever batch it is drawn in. Each image's
generator is drawn from in this order, the order diffusers' pipelines draw from a list of generators:

- text-to-image: the initial latent ``z_T``, then one noise tensor per re-noising step (LCM: every step but the last;
  TCD with γ > 0: every step but the last; DDIM and DPM-Solver draw nothing more);
- image-to-image: the VAE posterior sample of the encoded image (``mean + std·ε``, ``retrieve_latents`` with
  ``sample_mode="sample"``), then the noise that takes it to the first timestep, then the sampler's draws as above;
- inpainting (``StableDiffusionInpaintPipeline``): the posterior sample of the encoded init image, drawn when the
  UNet has 4 input channels (its latents are re-imposed on the kept region) or the strength is below 1 (its latents
  start the run); then the noise ``ε``, which is the initial latent at strength 1 and otherwise takes the image's
  latents to the first timestep (a 4-channel UNet's blend reuses it at every step); then the posterior sample of the
  masked image (the init image with the region to repaint set to 0, mid-grey), drawn for 4-channel UNets too, which
  do not use it; then the sampler's draws as above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcm.config.sampling import DEFAULT_GAMMA, DEFAULT_STRENGTH
from lcm.maths.consistency import consistency_function
from lcm.maths.guidance import cfg_combine
from lcm.maths.parameterization import Denoised, to_denoised
from lcm.maths.sampling import (
    HostDenoiser,
    StepHook,
    keep_known_region,
    randn_per_image,
    sample_ddim,
    sample_dpm_solver,
    sample_heun,
    sample_lcm,
    sample_tcd,
)
from lcm.maths.timesteps import Sampler, img2img_start, sampler_timesteps
from lcm.models.formats import guidance_input, takes_w
from lcm.models.latent_diffusion import LatentDiffusion, network_dtype
from lcm.models.text import TextEmbeddings

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_STRENGTH",
    "Sampler",
    "consistency_denoiser",
    "generate",
    "img2img_latents",
    "inpaint_latents",
    "inpaint_timesteps",
    "latent_shape",
    "repaint_mask",
    "sample_latents",
    "teacher_latents",
]


def latent_shape(model: LatentDiffusion, size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents of ``size = (height, width)`` pixels (default: the model's native size).

    Each side must be a multiple of the VAE's scale factor (8 for Stable Diffusion, 4 for the embedded model).
    """
    if size is None:
        return model.latent_shape
    factor = model.vae_scale_factor
    height, width = (int(v) for v in size)
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(
            f"height and width must be positive multiples of this model's VAE scale factor {factor}, "
            f"got {height}x{width}"
        )
    return (model.latent_shape[0], height // factor, width // factor)


def _check_sampler(model: LatentDiffusion, sampler: Sampler, negative_guidance: float) -> None:
    if sampler.for_distilled and not model.is_lcm:
        raise ValueError(
            f"the {sampler.value} sampler needs an LCM (a consistency-distilled model, or a base model with an "
            "LCM or TCD LoRA); use the ddim, dpm or dpmpp sampler"
        )
    if negative_guidance < 0:
        raise ValueError(f"negative guidance must be >= 0, got {negative_guidance}")
    if negative_guidance and model.cfg_free:
        raise ValueError(
            "this model was distilled CFG-free: its w is real classifier-free guidance against the negative prompt "
            "already; give w instead of negative guidance"
        )
    if negative_guidance and not sampler.for_distilled:
        raise ValueError(
            "negative guidance is for LCMs (lcm, tcd samplers); a teacher's negative prompt is the unconditional "
            "side of its classifier-free guidance, weighted by w"
        )


def _check_not_inpainting(model: LatentDiffusion) -> None:
    if model.is_inpainting:
        raise ValueError(
            "an inpainting model needs --image and --mask: its UNet takes a mask and a masked image beside the latents"
        )


def consistency_denoiser(
    model: LatentDiffusion,
    cond: TextEmbeddings,
    uncond: TextEmbeddings | None,
    w: float,
    negative_guidance: float = 0.0,
) -> HostDenoiser:
    """The distilled network's raw prediction ``(z, t) → Denoised(x̂0, ε̂)`` at one host-float ``t``.

    ``w`` is passed when the network takes it (a w-embedding, Flux's guidance; an LCM-LoRA takes none: ``w`` is
    then unused). With
    ``negative_guidance`` S > 0 the network also runs on ``uncond`` (the negative prompt) in the same batched forward
    (2B: twice the UNet work per step) and the outputs combine as classifier-free guidance,
    ``out(c) + S·(out(c) − out(neg))``; being affine in the output at the same (z, t), this is the same combination
    of x̂0 and of ε̂. Without it, this is one unguided call, as the LCM and TCD pipelines of diffusers make.
    """
    unet, batch = model.unet, len(cond)
    emb = model.w_input(torch.full((batch,), float(w))) if takes_w(unet) else None
    guided, scale = negative_guidance > 0, float(negative_guidance)
    if guided:
        if uncond is None or len(uncond) != batch:
            raise ValueError("negative guidance needs one negative-prompt embedding per image")
        text = TextEmbeddings.cat([cond, uncond])
        emb = None if emb is None else torch.cat([emb, emb])
    else:
        text = cond

    def denoise(z: torch.Tensor, t: float) -> Denoised:
        zz = torch.cat([z, z]) if guided else z
        t_batch = torch.full((zz.shape[0],), float(t), device=z.device)
        out = model.unet_output(zz, t_batch, text, emb).float()
        if guided:
            out = cfg_combine(*out.chunk(2), scale)
        alpha, sigma = model.schedule.alpha_sigma_at(float(t))
        return to_denoised(out, z, alpha, sigma, model.prediction_type)

    return denoise


def _run(
    model: LatentDiffusion,
    sampler: Sampler,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    cond: TextEmbeddings,
    uncond: TextEmbeddings,
    w: float | torch.Tensor,
    generators: list[torch.Generator],
    gamma: float,
    negative_guidance: float,
    lower_order_final: bool = True,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """Run ``sampler`` from the latent ``z`` along ``timesteps`` (already cut for img2img), ``after_step`` called
    after every step (inpainting's blend). ``w``: one for the batch, or per image ``[B]`` (teacher samplers)."""
    schedule = model.schedule
    if model.cfg_free and sampler.for_distilled:  # its w is real guidance: out(c) + w·(out(c) − out(neg))
        w, negative_guidance = 0.0, float(w)
    if sampler is Sampler.LCM:
        if not negative_guidance:  # the model's own consistency function (one UNet call per step)
            ws = torch.full((len(cond),), float(w))
            f = model.consistency_fn(cond, ws if takes_w(model.unet) else None)
        else:
            net = consistency_denoiser(model, cond, uncond, w, negative_guidance)

            def f(z: torch.Tensor, t: float) -> torch.Tensor:
                return consistency_function(z, net(z, t).x0, *model.boundary_at(t))

        return sample_lcm(f, z, timesteps, schedule, generators, after_step, model.randn_per_image)
    if sampler is Sampler.TCD:
        net = consistency_denoiser(model, cond, uncond, w, negative_guidance)
        return sample_tcd(net, z, timesteps, schedule, gamma, generators, after_step)
    per_image = isinstance(w, torch.Tensor)
    ws = w.float().cpu() if per_image else torch.full((len(cond),), float(w))
    # a guidance-distilled teacher (Flux-dev) takes its guidance 1 + w at every w, 0 included
    guided = per_image or w != 0 or guidance_input(model.unet)
    denoiser = model.guided_denoiser(cond, uncond, ws) if guided else model.denoiser(cond)
    if sampler is Sampler.DDIM:
        return sample_ddim(denoiser, z, timesteps, schedule, after_step)
    if sampler is Sampler.HEUN:
        return sample_heun(denoiser, z, timesteps, schedule, after_step)
    data_prediction = sampler is Sampler.DPM_SOLVER_PP_2M
    return sample_dpm_solver(denoiser, z, timesteps, schedule, data_prediction, lower_order_final, after_step)


def sample_latents(
    model: LatentDiffusion,
    cond,
    uncond,
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    timestep_spacing: str | None = None,
    *,
    gamma: float = DEFAULT_GAMMA,
    negative_guidance: float = 0.0,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` for per-image ``seeds``; ``cond``/``uncond`` are TextEmbeddings of B prompts.

    ``uncond`` is the negative prompt: the unconditional side of a teacher's guidance; for an LCM it is used only
    with ``negative_guidance`` > 0 (:func:`consistency_denoiser`). The timesteps are
    :func:`~lcm.maths.timesteps.sampler_timesteps`'s, ``timestep_spacing`` the teacher samplers' (None: the one
    rule, "trailing"). ``gamma`` is TCD's γ; ``size`` is ``(height, width)`` in pixels (default: the model's native
    size).
    """
    _check_sampler(model, sampler, negative_guidance)
    _check_not_inpainting(model)
    batch = len(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = randn_per_image((batch, *latent_shape(model, size)), gens).to(model.device)
    tokens = model.image_seq_len(*z.shape[-2:]) if model.is_flow else None  # a dynamic shift's input
    ts = sampler_timesteps(sampler, steps, model.scheduler_config, model.schedule, 1.0, timestep_spacing, tokens)
    return _run(model, sampler, z, ts, cond, uncond, w, gens, gamma, negative_guidance)


@torch.no_grad()
def teacher_latents(model: LatentDiffusion, z, cond, uncond, sampler: Sampler, steps: int, w: torch.Tensor):
    """A teacher sampler's latents from the noise ``z`` ``[B, C, h, w]`` at a guidance weight per image ``w`` ``[B]``
    (each image as :func:`sample_latents` draws it at its own w from the same noise). VP teachers."""
    if sampler.for_distilled or model.is_lcm or model.is_flow or w.shape != (z.shape[0],):
        raise ValueError(f"a VP teacher's sampler and one w per image, not {sampler.value} and {tuple(w.shape)}")
    ts = sampler_timesteps(sampler, steps, model.scheduler_config, model.schedule)
    return _run(model, sampler, z, ts, cond, uncond, w, [], DEFAULT_GAMMA, 0.0)


@torch.no_grad()
def encode_init_images(model: LatentDiffusion, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [−1, 1] → scaled latents, a VAE posterior sample per image from its generator.

    As diffusers' img2img ``prepare_latents`` with a list of generators: ``(mean + std·ε_i)·scaling_factor``, ε_i
    drawn from generator i in the VAE's dtype (the first draw of each generator).
    """
    dist = model.vae.encode(images.to(model.device, network_dtype(model.vae))).latent_dist
    eps = randn_per_image(dist.mean.shape, generators, dist.mean.device, dist.mean.dtype)
    return ((dist.mean + dist.std * eps - model.shift_factor) * model.scaling_factor).float()


def _check_init_images(images: torch.Tensor, seeds: Sequence[int]) -> None:
    if images.ndim != 4 or images.shape[0] != len(seeds):
        raise ValueError(f"give one init image per seed: images {tuple(images.shape)} for {len(seeds)} seeds")


def img2img_latents(
    model: LatentDiffusion,
    images: torch.Tensor,
    strength: float,
    cond,
    uncond,
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    timestep_spacing: str | None = None,
    *,
    gamma: float = DEFAULT_GAMMA,
    negative_guidance: float = 0.0,
) -> torch.Tensor:
    """Image-to-image latents ``[B, C, h, w]``: image i (``images`` ``[B, C, H, W]`` in [−1, 1], one per seed) is
    encoded, noised to the first timestep with seed i's generator, then denoised by ``sampler``.

    Timesteps from ``strength`` ∈ (0, 1] as :func:`~lcm.maths.timesteps.sampler_timesteps` says (the diffusers
    img2img pipeline of each sampler). The latent's size is the images' size. Draw order: see the module docstring.
    """
    _check_sampler(model, sampler, negative_guidance)
    _check_not_inpainting(model)
    _check_init_images(images, seeds)
    ts = sampler_timesteps(sampler, steps, model.scheduler_config, model.schedule, strength, timestep_spacing)
    # DPMSolverMultistepScheduler decides its last step's order on the length of the whole (steps-long) schedule
    lower_order_final = sampler is Sampler.LCM or steps < 15
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z0 = encode_init_images(model, images, gens)
    noise = randn_per_image(z0.shape, gens, z0.device, z0.dtype)
    z = model.schedule.add_noise(z0, noise, float(ts[0]))
    return _run(model, sampler, z, ts, cond, uncond, w, gens, gamma, negative_guidance, lower_order_final)


def repaint_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The mask ``[N, 1, H, W]`` (values in [0, 1]) of init images ``[B, C, H, W]``, binarised as diffusers' mask
    processor does (``do_binarize``): ≥ 0.5 → 1, repaint; < 0.5 → 0, keep. A one-line ``ValueError`` for a mask that
    has more than one channel, values outside [0, 1], or another size than the images."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"the mask must have one channel, [N, 1, H, W] (white = repaint), got {tuple(mask.shape)}")
    if mask.shape[-2:] != images.shape[-2:]:
        (mh, mw), (ih, iw) = mask.shape[-2:], images.shape[-2:]
        raise ValueError(f"the mask is {mw}x{mh} pixels but the init image is {iw}x{ih}: give a mask of its size")
    mask = mask.float()
    low, high = float(mask.min()), float(mask.max())
    if not (0.0 <= low and high <= 1.0):  # also refuses NaN
        raise ValueError(f"mask values must lie in [0, 1] (0 = keep, 1 = repaint), got values in [{low}, {high}]")
    return (mask >= 0.5).float()


def inpaint_timesteps(
    model: LatentDiffusion, sampler: Sampler, steps: int, strength: float, timestep_spacing: str | None = None
) -> torch.Tensor:
    """The timesteps an inpainting run visits: the last ``int(steps·strength)`` of the sampler's ``steps``-step
    schedule, for every sampler, LCM included (``StableDiffusionInpaintPipeline.get_timesteps``; unlike LCM img2img,
    which spreads ``steps`` over part of the skipping grid)."""
    if model.is_flow:
        raise ValueError("inpainting is not supported for flow-matching models")
    full = sampler_timesteps(sampler, steps, model.scheduler_config, model.schedule, spacing=timestep_spacing)
    return full[img2img_start(len(full), strength) :]


def _draw_masked_image_latents(
    model: LatentDiffusion, masked: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor | None:
    """The masked image's latents for an inpainting UNet; for a 4-channel UNet, which has no use for them, only
    their posterior draw (diffusers encodes the masked image for every UNet, so the generators move on the same)."""
    if model.is_inpainting:
        return encode_init_images(model, masked, generators)
    shape = (masked.shape[0], *latent_shape(model, tuple(masked.shape[-2:])))
    randn_per_image(shape, generators, dtype=network_dtype(model.vae))
    return None


def inpaint_latents(
    model: LatentDiffusion,
    images: torch.Tensor,
    mask: torch.Tensor,
    strength: float,
    cond,
    uncond,
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    timestep_spacing: str | None = None,
    *,
    gamma: float = DEFAULT_GAMMA,
    negative_guidance: float = 0.0,
) -> torch.Tensor:
    """Inpainting latents ``[B, C, h, w]``: the region of image i (``images`` ``[B, C, H, W]`` in [−1, 1], one per
    seed) where ``mask`` (``[B or 1, 1, H, W]`` in [0, 1], :func:`repaint_mask`) is white is repainted, the rest kept.

    As diffusers' ``StableDiffusionInpaintPipeline``: at ``strength`` 1 the run starts from pure noise, below 1 from
    the image's latents noised to the first of :func:`inpaint_timesteps`. The mask is resized to the latents'
    size (nearest). A UNet with 4 input channels (text-to-image) keeps the known region by blending after every step
    (:func:`~lcm.maths.sampling.keep_known_region`); an inpainting UNet (9 channels for SD) takes ``[z, mask,
    masked-image latents]`` and no blend. Draw order: see the module docstring.
    """
    _check_sampler(model, sampler, negative_guidance)
    _check_init_images(images, seeds)
    mask = repaint_mask(mask, images).to(images.device)
    if mask.shape[0] not in (1, len(seeds)):
        raise ValueError(f"give one mask, or one per init image: {mask.shape[0]} masks for {len(seeds)} images")
    mask = mask.expand(len(seeds), -1, -1, -1)
    ts = inpaint_timesteps(model, sampler, steps, strength, timestep_spacing)
    shape = (len(seeds), *latent_shape(model, tuple(images.shape[-2:])))
    blend = not model.is_inpainting
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    known = encode_init_images(model, images, gens) if blend or strength < 1 else None
    noise = randn_per_image(shape, gens, model.device)
    z = noise if strength == 1 else model.schedule.add_noise(known, noise, float(ts[0]))
    masked_latents = _draw_masked_image_latents(model, images * (mask < 0.5), gens)
    latent_mask = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(model.device)  # nearest, as diffusers
    if blend:
        net, after_step = model, keep_known_region(known, noise, latent_mask, ts, model.schedule)
    else:
        net, after_step = model.with_inpaint_condition(latent_mask, masked_latents), None
    options = {"lower_order_final": steps < 15, "after_step": after_step}  # DPM-Solver: on the whole schedule's length
    return _run(net, sampler, z, ts, cond, uncond, w, gens, gamma, negative_guidance, **options)


def generate(
    model: LatentDiffusion,
    prompts: Sequence[str],
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
    timestep_spacing: str | None = None,
    *,
    negative_prompt: str | Sequence[str] = "",
    gamma: float = DEFAULT_GAMMA,
    negative_guidance: float = 0.0,
    size: tuple[int, int] | None = None,
    init_images: torch.Tensor | None = None,
    strength: float = DEFAULT_STRENGTH,
    cache_prompts: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [−1, 1], image i from ``prompts[i]`` and ``seeds[i]`` (independent of batching).

    ``negative_prompt``: one for all images or one per image. ``init_images`` (``[N, C, H, W]``, or ``[1, …]`` for
    all) in [−1, 1] makes it image-to-image at ``strength``; their size is the output size, so ``size`` is then
    not used. With ``mask`` (``[N, 1, H, W]`` or ``[1, …]``, in [0, 1], white = repaint) it is inpainting
    (:func:`inpaint_latents`), which an inpainting model always needs. ``cache_prompts``: take the text embeddings
    from the model's prompt cache (for repeated prompts).
    """
    if len(prompts) != len(seeds):
        raise ValueError("give one seed per prompt")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError("give one negative prompt, or one per prompt")
    if init_images is not None and init_images.shape[0] not in (1, len(prompts)):
        raise ValueError(f"give one init image, or one per prompt: {init_images.shape[0]} for {len(prompts)}")
    if mask is not None:
        _check_generate_mask(mask, init_images, len(prompts))
    from tqdm import tqdm

    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=f"{sampler.value} {steps} steps", disable=not progress, unit="batch"):
        p = list(prompts[i : i + batch_size])
        cond = model.encode_prompts(p, cache=cache_prompts)
        uncond = model.encode_prompts(negatives[i : i + batch_size], cache=cache_prompts)
        batch_seeds = seeds[i : i + batch_size]
        options = {"gamma": gamma, "negative_guidance": negative_guidance}
        if init_images is None:
            latents = sample_latents(
                model, cond, uncond, sampler, steps, w, batch_seeds, timestep_spacing, size=size, **options
            )
        elif mask is None:
            images = _batch_of(init_images, i, len(p))
            latents = img2img_latents(
                model, images, strength, cond, uncond, sampler, steps, w, batch_seeds, timestep_spacing, **options
            )
        else:
            images, masks = _batch_of(init_images, i, len(p)), _batch_of(mask, i, len(p))
            latents = inpaint_latents(
                model, images, masks, strength, cond, uncond, sampler, steps, w, batch_seeds, timestep_spacing,
                **options,
            )  # fmt: skip
        out.append(model.decode(latents).cpu())
    return torch.cat(out)


def _check_generate_mask(mask: torch.Tensor, init_images: torch.Tensor | None, count: int) -> None:
    """``generate``'s mask: with an init image, one for all images or one per prompt, and a valid mask of its size."""
    if init_images is None:
        raise ValueError("a mask needs an init image to repaint (--image with --mask)")
    repaint_mask(mask, init_images)
    if mask.shape[0] not in (1, count):
        raise ValueError(f"give one mask, or one per prompt: {mask.shape[0]} for {count}")


def _batch_of(tensor: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows ``start … start + count`` of a per-image tensor, or its one row repeated ``count`` times."""
    return tensor[start : start + count] if tensor.shape[0] > 1 else tensor.expand(count, -1, -1, -1)
