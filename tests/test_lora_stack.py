"""LoRA stacks (a style LoRA plus an LCM-LoRA) and ``lcm merge``.

References are independent of the loader under test: diffusers' own ``load_lora_weights`` + ``set_adapters`` on a
pipeline, and weights merged by hand in this file (W + Σ scale · B·A) from the tensors that were written.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.models.export import export_lora
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec, accelerator_of
from test_lora import (
    _foreign_lora,
    _merge_by_hand,
    _trained_lora_student,
    _trained_lora_tensors,
    _unet_inputs,
    _write_kohya,
)

STYLE_SCALE, LCM_SCALE = 0.8, 1.0


@pytest.fixture
def stack(tiny_sd, tmp_path):
    """(teacher, style LoRA file in kohya naming + its layers, exported LCM-LoRA folder + its tensors)."""
    teacher = tiny_sd
    style_layers = _foreign_lora(LatentDiffusion.from_pretrained(teacher).unet, seed=5)
    style = tmp_path / "style.safetensors"
    _write_kohya(style_layers, style)
    student = _trained_lora_student(teacher, seed=1)
    lcm_tensors = _trained_lora_tensors(student.unet)
    lcm_lora = export_lora(student.unet, teacher, 10, tmp_path / "lcm-lora", {"lcd": {"w_min": 2.0, "w_max": 6.0}})
    return teacher, style, style_layers, lcm_lora, lcm_tensors


def _merged_by_hand(teacher, style_layers, lcm_tensors):
    """The base UNet with both LoRAs added at their scales, without peft or diffusers."""
    unet = _merge_by_hand(LatentDiffusion.from_pretrained(teacher).unet, style_layers, scale=STYLE_SCALE)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, (a, b) in lcm_tensors.items():  # b already carries alpha / rank
            weight = modules[name].weight
            weight += LCM_SCALE * (b.flatten(1) @ a.flatten(1)).view_as(weight)
    return unet


def test_a_stack_computes_diffusers_set_adapters_and_the_hand_merged_weights(stack, parity):
    from diffusers import StableDiffusionPipeline

    teacher, style, style_layers, lcm_lora, lcm_tensors = stack
    specs = [LoraSpec(str(style), STYLE_SCALE), LoraSpec(str(lcm_lora), LCM_SCALE)]
    ours = LatentDiffusion.from_pretrained(teacher, loras=specs)
    assert ours.is_lcm and ours.accelerator == specs[1]  # the LoRA with a record is the accelerator
    assert ours.scheduler_config["original_inference_steps"] == 10 and ours.w_range == (2.0, 6.0)

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.load_lora_weights(str(lcm_lora), adapter_name="lcm")
    pipe.set_adapters(["style", "lcm"], adapter_weights=[STYLE_SCALE, LCM_SCALE])
    by_hand = _merged_by_hand(teacher, style_layers, lcm_tensors)

    z, t, text = _unet_inputs(ours)
    with torch.no_grad():
        got = ours.unet_output(z, t, text)
        bare = ours.with_network(LatentDiffusion.from_pretrained(teacher).unet).unet_output(z, t, text)
        one = LatentDiffusion.from_pretrained(teacher, loras=[specs[1]]).unet_output(z, t, text)
        assert (got - bare).abs().max() > 1e-2 and (got - one).abs().max() > 1e-2  # both LoRAs matter
        parity(ours.with_network(pipe.unet).unet_output(z, t, text), got, 1e-5, "stack-vs-diffusers-set_adapters")
        parity(ours.with_network(by_hand).unet_output(z, t, text), got, 1e-5, "stack-vs-hand-merged")


def test_lcm_merge_writes_the_hand_merged_weights_and_an_lcm(stack, tmp_path, capsys):
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    teacher, style, style_layers, lcm_lora, lcm_tensors = stack
    out = tmp_path / "merged"
    args = ["merge", "--model", str(teacher), "--lora", f"{style}:{STYLE_SCALE}", "--lora", str(lcm_lora)]
    assert main([*args, "--out", str(out)]) == 0
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    reference = _merged_by_hand(teacher, style_layers, lcm_tensors).state_dict()
    assert merged.keys() == reference.keys()
    base = LatentDiffusion.from_pretrained(teacher).unet.state_dict()
    changed = 0
    for key, value in reference.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((merged[key] - value).abs().max() / scale) <= 1e-6, key
        changed += not torch.equal(value, base[key])
    assert changed >= len(style_layers)  # every adapted weight moved

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 10
    model = LatentDiffusion.from_pretrained(out)
    assert model.is_lcm and model.w_range == (2.0, 6.0)
    card = (out / "README.md").read_text()
    assert str(style) in card and "| 0.8 | style |" in card and "| 1 | lcm |" in card

    # what lcm sample draws from the merged folder is what it draws from the stack
    sample = ["sample", "--prompt", "a cat", "--num-images", "2", "--steps", "2", "--scale", "1"]
    assert main([*sample, "--model", str(out), "--out", str(tmp_path / "a")]) == 0
    assert main([*sample, "--model", str(teacher), *args[3:], "--out", str(tmp_path / "b")]) == 0
    assert "lcm, 2 steps" in capsys.readouterr().out
    for name in ("000-seed0.png", "001-seed1.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("a", "b"))
        assert np.abs(a - b).max() <= 1, name
    info = Image.open(tmp_path / "b" / "000-seed0.png").info
    assert info["lora"] == f"{style}:0.8 {lcm_lora}:1"


def test_a_style_only_merge_keeps_the_base_scheduler(stack, tmp_path):
    teacher, style, style_layers, _, _ = stack
    out = tmp_path / "style-merged"
    assert main(["merge", "--model", str(teacher), "--lora", f"{style}:0.5:style", "--out", str(out)]) == 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (
        config["_class_name"]
        == json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    )
    assert not LatentDiffusion.from_pretrained(out).is_lcm
    record = json.loads((out / "lcm_merge.json").read_text())["merged"]
    assert record["loras"][0]["scale"] == 0.5 and record["loras"][0]["role"] == "style"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", LoraSpec("style.safetensors", 1.0)),
        ("style.safetensors:0.8", LoraSpec("style.safetensors", 0.8)),
        ("lcm:1.5:lcm", LoraSpec("lcm", 1.5, "lcm")),
        ("runs/a:b/x.safetensors:style", LoraSpec("runs/a:b/x.safetensors", 1.0, "style")),
        ("C:/loras/x.safetensors:-0.5", LoraSpec("C:/loras/x.safetensors", -0.5)),
    ],
)
def test_lora_specs_parse(text, expected):
    assert LoraSpec.parse(text) == expected


def test_ambiguous_or_foreign_stacks_are_refused_in_one_line(stack, tmp_path, capsys):
    from safetensors.torch import save_file

    teacher, style, _, lcm_lora, _ = stack
    other = tmp_path / "other.safetensors"
    _write_kohya(_foreign_lora(LatentDiffusion.from_pretrained(teacher).unet, seed=7), other)
    with pytest.raises(ValueError, match="none is known as the LCM-LoRA"):
        accelerator_of([LoraSpec(str(style)), LoraSpec(str(other))], base_is_lcm=False)
    with pytest.raises(ValueError, match="2 LCM-LoRAs"):
        accelerator_of([LoraSpec(str(lcm_lora)), LoraSpec(str(other), role="lcm")], base_is_lcm=False)
    assert accelerator_of([LoraSpec(str(style)), LoraSpec(str(other))], base_is_lcm=True) is None
    assert accelerator_of([LoraSpec(str(style), role="style")], base_is_lcm=False) is None

    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    width = dict(LatentDiffusion.from_pretrained(teacher).unet.named_modules())[module].in_features
    wrong = {
        f"unet.{module}.lora_A.weight": torch.zeros(2, width + 8),
        f"unet.{module}.lora_B.weight": torch.zeros(width, 2),
    }
    save_file(wrong, tmp_path / "wrong.safetensors")
    base = ["sample", "--model", str(teacher), "--prompt", "a cat", "--num-images", "1", "--out", str(tmp_path / "x")]
    for loras, message in (
        ([str(tmp_path / "wrong.safetensors")], "does not fit this UNet (a LoRA for another base model?)"),
        ([str(style), str(other)], "mark it FILE:SCALE:lcm"),
        ([f"{style}:nan"], "the scale must be a finite number"),
    ):
        assert main([*base, *(x for lora in loras for x in ("--lora", lora))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("lcm sample: error:") and message in err[-1], err
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--model", str(teacher), "--lora", str(style), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["merge", "--model", str(teacher), "--lora", str(style), "--out", str(teacher)]) == 2
    assert "is the base model" in capsys.readouterr().err


def test_lcm_eval_scores_a_stack_as_one_more_method(tmp_path, capsys):
    """``lcm eval --lora``: the stack on the teacher is its own rows (an LCM with an LCM-LoRA among them, the teacher
    samplers without), named with every LoRA and its scale, reused when rerun and redone when a file changes."""
    from lcm.evaluation.results import load_results
    from lcm.shipped import default_model_path

    unet = LatentDiffusion.from_pretrained(default_model_path(), with_text_encoder=False).unet
    style, accelerator = tmp_path / "style.safetensors", tmp_path / "lcm.safetensors"
    _write_kohya(_foreign_lora(unet, seed=5, rank=2), style)
    _write_kohya(_foreign_lora(unet, seed=6, rank=2), accelerator)
    out = tmp_path / "eval"
    args = ["eval", "--teacher-samplers", "ddim", "--teacher-steps", "1", "--lcm-steps", "1", "--num-samples", "8"]
    args += ["--batch-size", "8", "--w", "3", "--out", str(out), "--lora", f"{style}:0.5", "--lora"]
    assert main([*args, f"{accelerator}:lcm"]) == 0
    records = load_results(out / "results.json")[1]
    teacher, stack = records
    assert (teacher.method, stack.method, stack.sampler) == ("teacher DDIM", "LoRA stack", "lcm")
    assert stack.model == f"{default_model_path()} + {style}:0.5 + {accelerator}:1:lcm"
    assert stack.metrics != teacher.metrics
    capsys.readouterr()
    assert main([*args, f"{accelerator}:lcm"]) == 0
    assert "2 rows reused" in capsys.readouterr().out
    assert main([*args[:-3], "--lora", f"{style}:0.5:style", "--overwrite"]) == 0  # no accelerator: teacher rows
    assert [r.method for r in load_results(out / "results.json")[1]] == ["teacher DDIM", "teacher DDIM + LoRA"]
