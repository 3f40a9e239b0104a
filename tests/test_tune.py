"""``lcm tune``: a diffusion model's own denoising loss against diffusers' scheduler arithmetic, and the style LoRA it
exports loading in diffusers and stacking with an LCM-LoRA."""

import json

import pytest
import torch

from lcm.cli import main
from lcm.config import StudentConfig, StudentKind, TuneConfig
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec, accelerator_of
from lcm.training.tune import TuneTask
from test_lora import _foreign_lora, _write_kohya
from tiny_models import build_tiny_sd


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_tune_loss_is_the_schedulers_denoising_loss(prediction, tmp_path, captioned_images):
    """The same draws written out with diffusers' DDPMScheduler (add_noise, get_velocity) and a direct UNet call;
    half the captions dropped to the empty prompt."""
    from diffusers import DDPMScheduler

    from lcm.images import load_image

    folder = build_tiny_sd(tmp_path / "sd", prediction)
    model = LatentDiffusion.from_pretrained(folder)
    task = TuneTask(model, TuneConfig(caption_dropout=0.5), StudentConfig(kind=StudentKind.FULL))
    images = torch.cat([load_image(captioned_images / f"{i}.png", 3, (64, 64)) for i in range(4)])
    captions = [f"a photo of a cat {i}" for i in range(4)]
    with torch.no_grad():
        ours = task.loss({"pixel_values": images, "caption": captions}, torch.Generator().manual_seed(3))

        g = torch.Generator().manual_seed(3)
        dist = model.vae.encode(images).latent_dist
        z0 = dist.sample(g) * model.vae.config.scaling_factor
        dropped = torch.rand(4, generator=g) < 0.5
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        z_t = scheduler.add_noise(z0, noise, t)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(z0, noise, t)
        text = [("" if d else c) for d, c in zip(dropped.tolist(), captions, strict=True)]
        states = torch.cat([model.encode_prompts([p]).hidden_states for p in text])
        output = model.unet(z_t, t, encoder_hidden_states=states).sample
        reference = (output - target).square().flatten(1).mean(1)
    assert 0 < dropped.sum() < 4  # both kinds of caption are in the batch
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_lcm_tune_exports_a_style_lora_that_diffusers_loads_and_that_stacks(tiny_sd, captioned_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    from lcm.models.lora import adapted_modules

    out = tmp_path / "style"
    args = ["tune", "--model", str(tiny_sd), "--data", str(captioned_images), "--out", str(out), "--student", "lora"]
    assert main([*args, "--lora-rank", "4", "--max-steps", "3", "--batch-size", "2", "--validate-every", "0"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "lcm_lora.json").exists()
    record = json.loads((out / "lcm_tune.json").read_text())
    assert record["method"] == "tune" and record["tune"]["caption_dropout"] == 0.1

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(out)
    loaded = LatentDiffusion.from_pretrained(tiny_sd, loras=[LoraSpec(str(out), 1.0, "style")])
    assert not loaded.is_lcm  # a style LoRA alone samples as the base
    assert set(adapted_modules(pipe.unet)) == set(adapted_modules(loaded.unet))
    b = [m.lora_B["default_0"].weight for m in adapted_modules(loaded.unet).values()]
    assert any(w.abs().max() > 0 for w in b)  # trained: lora_B left zero
    accelerator = tmp_path / "lcm-lora.safetensors"  # an LCM-LoRA made elsewhere: no record
    _write_kohya(_foreign_lora(LatentDiffusion.from_pretrained(tiny_sd).unet), accelerator)
    stack = [LoraSpec(str(out), 0.8), LoraSpec(str(accelerator))]
    assert accelerator_of(stack, base_is_lcm=False) == stack[1]  # lcm tune's record says which is the style

    assert main(
        ["tune", "--model", str(out / "missing"), "--data", str(captioned_images), "--out", str(tmp_path / "x")]
    )
    lcm = tmp_path / "lcm"
    distill = ["distill", "--teacher", str(tiny_sd), "--data", str(captioned_images), "--out", str(lcm)]
    assert main([*distill, "--max-steps", "1", "--batch-size", "2", "--validate-every", "0"]) == 0
    assert main(["tune", "--model", str(lcm), "--data", str(captioned_images), "--out", str(tmp_path / "y")]) == 2


def test_tune_refuses_an_lcm(tiny_sd, tmp_path, capsys):
    from lcm.models.formats import lcm_scheduler_config

    model = LatentDiffusion.from_pretrained(tiny_sd)
    model.scheduler_config = lcm_scheduler_config(model.scheduler_config, 50)
    with pytest.raises(ValueError, match="an LCM is fine-tuned by lcm finetune"):
        TuneTask(model)


def test_a_full_tune_exports_a_model_folder_with_the_bases_scheduler(tiny_sd, captioned_images, tmp_path):
    out = tmp_path / "full"
    args = ["tune", "--model", str(tiny_sd), "--data", str(captioned_images), "--out", str(out), "--max-steps", "2"]
    assert main([*args, "--batch-size", "2", "--validate-every", "0", "--learning-rate", "1e-3"]) == 0
    tuned, base = LatentDiffusion.from_pretrained(out), LatentDiffusion.from_pretrained(tiny_sd)
    assert tuned.scheduler_config == base.scheduler_config and not tuned.is_lcm
    moved = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert moved and json.loads((out / "lcm_tune.json").read_text())["student"] == "full"
