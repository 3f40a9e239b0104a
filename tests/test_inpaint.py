"""Inpainting against diffusers: ``lcm.sample.generate(init_images=, mask=, strength=)`` on one side, diffusers'
``StableDiffusionInpaintPipeline`` on the other (``LCMScheduler`` / ``TCDScheduler`` for a w-conditioned LCM,
``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` with classifier-free guidance for a teacher), stepping the same
tiny random UNet (4 input channels: the known region is blended back after each step; 9: an inpainting UNet) and VAE
with the same per-image generators. The reference side never calls our code. Pixels are compared in [0, 1], the
pipelines' ``output_type="pt"``."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionInpaintPipeline,
    TCDScheduler,
)
from PIL import Image

from lcm.images import image_to_tensor
from lcm.maths.guidance import guidance_scale_from_w
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.sample import Sampler, encode_init_images, generate, inpaint_latents
from test_img2img_tcd_parity import SD, W, _one_thread, _pipe, contexts, init_pils  # noqa: F401 (autouse)
from tiny_models import tiny_unet

SEEDS = [31, 32]
PROMPTS = ["a cat", "a dog"]
NEGATIVES = ["blurry", "dark"]
SIDE = 16  # pixels; the tiny VAE's factor 2 makes latents 8²
TOL = 1e-5  # max |ours − diffusers| on pixels in [0, 1]
STEPS = (1, 2, 4)
STRENGTHS = (1.0, 0.6)
GAMMA = 0.5  # TCD's γ, diffusers' eta

TEACHER = {"steps_offset": 1, "timestep_spacing": "trailing"}
SCHEDULERS = {  # steps_offset 1, which the pipeline would otherwise impose; the teachers' on the library's default
    # "trailing" spacing, so that no spacing has to be passed
    "lcm": lambda: LCMScheduler(**SD, steps_offset=1),
    "tcd": lambda: TCDScheduler(**SD, steps_offset=1),
    "ddim": lambda: DDIMScheduler(**SD, **TEACHER, clip_sample=False, set_alpha_to_one=False),
    "dpm": lambda: DPMSolverMultistepScheduler(
        **SD, **TEACHER, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
    ),
    "dpmpp": lambda: DPMSolverMultistepScheduler(**SD, **TEACHER, algorithm_type="dpmsolver++"),
}


class TableEncoder:
    """A text encoder that looks prompts up in a table: the pipeline gets the same embeddings as ``prompt_embeds``."""

    name = "table"

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        return TextEmbeddings(torch.stack([self.table[p] for p in prompts]))


def embeddings() -> dict[str, torch.Tensor]:
    """Token states of the prompts, the negative prompts and "" (the LCMs' unused negative side)."""
    cond, negative = contexts()
    return {**dict(zip(PROMPTS, cond, strict=False)), **dict(zip(NEGATIVES, negative, strict=False)), "": negative[-1]}


def mask_pils() -> list[Image.Image]:
    """Two different masks (255 = repaint) whose edges fall inside 2×2 latent cells, and grey levels on both sides
    of 0.5 so that the binarisation matters: 100 (keep), 180 (repaint)."""
    first = np.zeros((SIDE, SIDE), dtype=np.uint8)
    first[3:12, 5:14] = 255
    first[0:2, :] = 100
    second = np.full((SIDE, SIDE), 100, dtype=np.uint8)
    second[:, :7] = 180
    second[9:15, 9:15] = 255
    return [Image.fromarray(m, mode="L") for m in (first, second)]


def mask_tensor(pils: list[Image.Image]) -> torch.Tensor:
    """Masks ``[N, 1, H, W]`` in [0, 1], as ``np.asarray(pil) / 255`` (the library's input; it binarises)."""
    return torch.stack([torch.from_numpy(np.asarray(p).astype(np.float32) / 255.0)[None] for p in pils])


def init_images() -> tuple[list[Image.Image], torch.Tensor]:
    pils = init_pils(SIDE)[: len(SEEDS)]
    return pils, torch.cat([image_to_tensor(p) for p in pils])


def gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def pipeline_and_model(sampler: str, in_channels: int):
    """The diffusers inpainting pipeline and our model around the very same networks and scheduler config."""
    distilled = Sampler(sampler).for_distilled
    unet = tiny_unet(in_channels, w_conditioned=distilled, seed=in_channels)
    pipe = _pipe(StableDiffusionInpaintPipeline, unet, SCHEDULERS[sampler](), image_encoder=None)
    model = LatentDiffusion(pipe.unet, pipe.vae, dict(pipe.scheduler.config), text_encoder=TableEncoder(embeddings()))
    return pipe, model


def reference(pipe, sampler: str, steps: int, strength: float) -> torch.Tensor:
    """The pipeline's images in [0, 1]; a teacher guides against the negative prompts (guidance_scale = w + 1)."""
    table = embeddings()
    pils, _ = init_images()
    kwargs = dict(image=pils, mask_image=mask_pils(), height=SIDE, width=SIDE, strength=strength)
    kwargs.update(num_inference_steps=steps, guidance_scale=guidance_scale_from_w(W), generator=gens())
    kwargs.update(prompt_embeds=torch.stack([table[p] for p in PROMPTS]), output_type="pt")
    if not Sampler(sampler).for_distilled:
        kwargs.update(negative_prompt_embeds=torch.stack([table[n] for n in NEGATIVES]))
    if sampler == "tcd":
        kwargs.update(eta=GAMMA)
    return pipe(**kwargs).images


def ours(model: LatentDiffusion, sampler: str, steps: int, strength: float) -> torch.Tensor:
    """``generate``'s images mapped from [−1, 1] to the pipelines' [0, 1]."""
    _, images = init_images()
    negatives = "" if Sampler(sampler).for_distilled else NEGATIVES
    out = generate(
        model, PROMPTS, Sampler(sampler), steps, W, SEEDS, negative_prompt=negatives,
        init_images=images, mask=mask_tensor(mask_pils()), strength=strength, gamma=GAMMA,
    )  # fmt: skip
    return (out + 1) / 2


def assert_same_pixels(parity, mine: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    """max |mine − ref| ≤ 1e-5 on [0, 1] pixels (also recorded, relative to max |ref|, in the parity summary)."""
    diff = float((mine.double() - ref.double()).abs().max())
    assert diff <= TOL, f"{label}: max abs pixel difference {diff:.2e} > {TOL:.0e}"
    parity(mine, ref, tol=TOL, label=label)


# --- parity ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_channels", [4, 9])
@pytest.mark.parametrize("sampler", ["lcm", "tcd", "ddim", "dpm", "dpmpp"])
def test_inpainting_equals_stable_diffusion_inpaint_pipeline(sampler, in_channels, parity):
    """Every sampler, a 4-channel UNet (blend after each step) and an inpainting UNet, 1, 2 and 4 steps at strength
    1 (from pure noise) and 0.6 (from the noised image); two images with their own seeds, masks and negative
    prompts. 1 step at 0.6 runs int(0.6) = 0 steps: both refuse it."""
    pipe, model = pipeline_and_model(sampler, in_channels)
    for steps in STEPS:
        for strength in STRENGTHS:
            if int(steps * strength) == 0:
                with pytest.raises(ValueError):
                    reference(pipe, sampler, steps, strength)
                with pytest.raises(ValueError, match="runs int"):
                    ours(model, sampler, steps, strength)
                continue
            label = f"{sampler}-{in_channels}ch-{steps}steps-strength{strength}"
            assert_same_pixels(
                parity, ours(model, sampler, steps, strength), reference(pipe, sampler, steps, strength), label
            )


def test_blend_keeps_the_known_latents():
    """With a 4-channel UNet the result's latents are the init image's (its posterior sample, the generators' first
    draw) wherever the latent-size mask keeps, and not elsewhere."""
    _, model = pipeline_and_model("lcm", 4)
    _, images = init_images()
    masks = mask_tensor(mask_pils())
    cond = model.encode_prompts(PROMPTS)
    got = inpaint_latents(model, images, masks, 1.0, cond, None, Sampler.LCM, 2, W, SEEDS)
    known = encode_init_images(model, images, gens())
    keep = torch.nn.functional.interpolate((masks >= 0.5).float(), size=got.shape[-2:]).expand_as(got) == 0
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(got[keep], known[keep], rtol=0, atol=0)
    assert (got[~keep] - known[~keep]).abs().min() > 0


def test_an_image_is_the_same_in_any_batch_and_one_mask_serves_all():
    """``generate`` in batches of one equals one batch of two, with one mask for both images (9-channel UNet)."""
    _, model = pipeline_and_model("ddim", 9)
    _, images = init_images()
    one_mask = mask_tensor(mask_pils())[:1]
    options = dict(negative_prompt=NEGATIVES, init_images=images, mask=one_mask, strength=0.6)
    together = generate(model, PROMPTS, Sampler.DDIM, 4, W, SEEDS, **options)
    apart = generate(model, PROMPTS, Sampler.DDIM, 4, W, SEEDS, batch_size=1, **options)
    torch.testing.assert_close(apart, together, rtol=0, atol=1e-5)


def test_the_latent_channels_are_the_vaes():
    """An inpainting UNet takes 9 channels, but its latents have the VAE's 4."""
    _, model = pipeline_and_model("ddim", 9)
    assert model.is_inpainting and model.latent_shape == (4, 8, 8)
    _, teacher = pipeline_and_model("ddim", 4)
    assert not teacher.is_inpainting and teacher.latent_shape == (4, 8, 8)


# --- refusals --------------------------------------------------------------------------------------------------------
def test_an_inpainting_model_needs_an_image_and_a_mask():
    _, model = pipeline_and_model("ddim", 9)
    _, images = init_images()
    with pytest.raises(ValueError, match="an inpainting model needs --image and --mask"):
        generate(model, PROMPTS, Sampler.DDIM, 2, W, SEEDS)
    with pytest.raises(ValueError, match="an inpainting model needs --image and --mask"):
        generate(model, PROMPTS, Sampler.DDIM, 2, W, SEEDS, init_images=images, strength=0.5)


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.ones(2, 1, SIDE, SIDE // 2), "the mask is 8x16 pixels but the init image is 16x16"),
        (torch.ones(2, 3, SIDE, SIDE), "one channel"),
        (torch.ones(2, SIDE, SIDE), "one channel"),
        (torch.full((2, 1, SIDE, SIDE), 255.0), r"in \[0, 1\]"),
        (torch.full((2, 1, SIDE, SIDE), -0.1), r"in \[0, 1\]"),
        (torch.full((2, 1, SIDE, SIDE), float("nan")), r"in \[0, 1\]"),
        (torch.ones(3, 1, SIDE, SIDE), "one mask, or one per prompt"),
    ],
)
def test_bad_masks_are_refused_in_one_line(mask, message):
    _, model = pipeline_and_model("ddim", 4)
    _, images = init_images()
    with pytest.raises(ValueError, match=message) as error:
        generate(model, PROMPTS, Sampler.DDIM, 2, W, SEEDS, init_images=images, mask=mask)
    assert "\n" not in str(error.value)


def test_a_mask_needs_an_init_image():
    _, model = pipeline_and_model("ddim", 4)
    with pytest.raises(ValueError, match="a mask needs an init image"):
        generate(model, PROMPTS, Sampler.DDIM, 2, W, SEEDS, mask=torch.ones(1, 1, SIDE, SIDE))


def test_lcm_sample_inpaints_with_mask_files(tmp_path, capsys):
    """``lcm sample --image --mask``: the mask file read as greyscale in [0, 1], strength 1 by default, the images
    ``generate`` draws with them; the black region of the result stays the init image's."""
    from lcm.cli import main
    from lcm.images import load_image, load_mask, to_uint8
    from lcm.shipped import default_sampling_path

    model = LatentDiffusion.from_pretrained(default_sampling_path())
    side = model.latent_shape[1] * model.vae_scale_factor
    init = np.zeros((side, side), np.uint8)
    init[4:28, 8:24] = 230  # a bright block
    mask = np.zeros((side, side), np.uint8)
    mask[:, side // 2 :] = 255  # repaint the right half
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = [
        "sample",
        "--prompt",
        "a sandal",
        "--num-images",
        "1",
        "--steps",
        "2",
        "--image",
        str(tmp_path / "init.png"),
    ]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "a.png")]) == 0
    assert "inpainting strength 1" in capsys.readouterr().out
    image, repaint = load_image(tmp_path / "init.png", 1), load_mask(tmp_path / "mask.png")
    expected = generate(model, ["a sandal"], Sampler.LCM, 2, model.default_w, [0], init_images=image, mask=repaint,
                        strength=1.0)  # fmt: skip
    drawn = np.asarray(Image.open(tmp_path / "a.png")).astype(int)
    assert np.abs(drawn - to_uint8(expected)[0, ..., 0]).max() <= 1
    kept, repainted = (np.abs(drawn - init)[:, cols].mean() for cols in (slice(0, side // 4), slice(side // 2, None)))
    assert kept < 20 < repainted, (kept, repainted)  # the left stays the init image (through the VAE), the right not
    assert Image.open(tmp_path / "a.png").info["mask"] == str(tmp_path / "mask.png")
    assert main([*args[:-2], "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "b.png")]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
