"""lcm distill on tiny SD-1.5- and SDXL-shaped teachers, then the exports loaded by diffusers' own pipelines."""

import json

import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import adapted_modules
from lcm.models.student import add_lora
from lcm.sample import Sampler, sample_latents
from tiny_models import build_tiny_sd, build_tiny_sdxl

PROMPTS = ["a photo of a cat", "a red car"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """8 readable images with captions, one corrupt file, one image without a caption."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(8):
        pixels = (torch.rand(64, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append({"file_name": f"{i}.png", "text": f"{PROMPTS[i % 2]} number {i}"})
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    lines.append({"file_name": "broken.png", "text": "a broken image"})
    Image.fromarray(pixels).save(root / "nocaption.png")
    lines.append({"file_name": "nocaption.png", "text": ""})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def _distill(teacher, data, out, *extra):
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--batch-size", "4"]
    args += ["--learning-rate", "1e-4", "--validate-every", "0", "--checkpoint-every", "100", "--log-every", "1"]
    if "--max-steps" not in extra:
        args += ["--max-steps", "3"]
    assert main([*args, *extra]) == 0
    return out


def _ours(folder, w=None):
    model = LatentDiffusion.from_pretrained(folder)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_prompts([""] * 2)
    return sample_latents(model, cond, uncond, Sampler.LCM, 2, w if w is not None else 0.0, SEEDS)


def _gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_full_export_round_trips_through_latent_consistency_pipeline(ptype, image_folder, tmp_path, parity, capsys):
    from diffusers import LatentConsistencyModelPipeline

    teacher = build_tiny_sd(tmp_path / "teacher", ptype)
    out = _distill(teacher, image_folder, tmp_path / "lcm", "--max-steps", "3")
    assert "skipped 2 samples" in capsys.readouterr().out  # the corrupt file and the empty caption
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == ptype and pipe.unet.config.time_cond_proj_dim == 256
    w = 5.0
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=w + 1, generator=_gens(), output_type="latent").images
    parity(_ours(out, w), ref, tol=1e-4, label=ptype)
    images = pipe(PROMPTS, num_inference_steps=2, guidance_scale=w + 1, generator=_gens(), output_type="np").images
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_lora_export_loads_with_load_lora_weights(tiny_sd, image_folder, tmp_path, parity):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    teacher = tiny_sd
    _distill(teacher, image_folder, tmp_path / "lora", "--student", "lora", "--lora-rank", "4")
    out = _distill(
        teacher, image_folder, tmp_path / "lora-a2", "--student", "lora", "--lora-rank", "4", "--lora-alpha", "2"
    )
    meta = json.loads((out / "lcm_lora.json").read_text())
    assert meta["original_inference_steps"] == 50
    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(out)
    # every module the distillation adapted arrives (the adapters of a fresh student with the same settings)
    fresh = add_lora(LatentDiffusion.from_pretrained(teacher, with_text_encoder=False).unet, rank=4)
    assert set(adapted_modules(pipe.unet)) == set(adapted_modules(fresh))
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=_gens(), output_type="latent").images
    ours = _ours(out)
    parity(ours, ref, tol=1e-4, label="lora")
    # the LoRA changed the UNet: sampling the bare teacher the same way gives something else
    pipe.unload_lora_weights()
    bare = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=_gens(), output_type="latent").images
    assert (bare - ref).abs().max() > 1e-3


def test_fused_lora_export_is_a_full_lcm_folder(tiny_sd, image_folder, tmp_path, parity):
    from diffusers import StableDiffusionPipeline

    teacher = tiny_sd
    lora = _distill(
        teacher, image_folder, tmp_path / "lora", "--student", "lora", "--lora-rank", "4", "--max-steps", "2"
    )
    fused = _distill(
        teacher,
        image_folder,
        tmp_path / "fused",
        "--student",
        "lora",
        "--lora-rank",
        "4",
        "--max-steps",
        "2",
        "--fuse-lora",
    )
    pipe = StableDiffusionPipeline.from_pretrained(fused, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    # W + BA in one matrix rounds differently from W x + B(A x): equal to float32 accuracy, not bit for bit
    parity(_ours(fused), _ours(lora), tol=2e-3, label="fused-vs-adapter")


def test_sdxl_full_and_lora(image_folder, tmp_path, parity):
    from diffusers import StableDiffusionXLPipeline

    teacher = build_tiny_sdxl(tmp_path / "teacher")
    out = _distill(teacher, image_folder, tmp_path / "lcm", "--max-steps", "2", "--solver", "dpm")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == 256
    w = 4.0
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=w + 1, generator=_gens(), output_type="latent").images
    parity(_ours(out, w), ref, tol=1e-4, label="sdxl-full")
    lora = _distill(
        teacher, image_folder, tmp_path / "lora", "--student", "lora", "--lora-rank", "4", "--max-steps", "2"
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    images = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=_gens(), output_type="np").images
    assert images.shape[0] == 2 and torch.isfinite(torch.from_numpy(images)).all()


def test_loss_falls_on_a_tiny_teacher(tiny_sd, image_folder, tmp_path):
    teacher = tiny_sd
    out = _distill(teacher, image_folder, tmp_path / "lcm", "--max-steps", "40", "--learning-rate", "3e-4")
    history = [h["loss"] for h in json.loads((out / "train" / "train_history.json").read_text())]
    first, last = sum(history[:8]) / 8, sum(history[-8:]) / 8
    assert last < first, (first, last)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--teacher", "/nonexistent/model"], "no model folder"),
        (["--w-min", "9", "--w-max", "2"], "--w-min"),
        (["--data", "/nonexistent/data"], "no such file or directory"),
        (["--max-steps", "0"], "max-steps"),
    ],
)
def test_distill_errors_are_one_clear_line(tiny_sd, args, message, tmp_path, capsys):
    teacher = tiny_sd
    base = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "o"), "--data", "fashion-mnist"]
    capsys.readouterr()  # forget what building the teacher printed
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lcm distill: error:") and message in last.lower(), err
