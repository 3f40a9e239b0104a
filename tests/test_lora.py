"""LCM-LoRA files: what is exported loads completely, and LoRA files made elsewhere apply here.

Every comparison is against the student held in memory, or against a UNet whose weights were merged by hand in this
file (W + scale·B·A), never against a second copy that went through the loader under test.
"""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.images import to_uint8
from lcm.maths.guidance import w_embedding
from lcm.models.export import export_lcm_folder, export_lora
from lcm.models.formats import lcm_scheduler_config
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec, adapted_modules
from lcm.models.student import add_lora, full_student
from lcm.sample import Sampler, generate
from tiny_models import build_tiny_sd, build_tiny_sdxl

RANK, ALPHA = 4, 2.0  # scale alpha / rank = 0.5: a wrong or missing scale shows


def _trained_lora_student(teacher_folder, seed=0):
    """A LoRA student as training leaves it: every adapter non-zero (lora_B starts at zero, so draw it)."""
    model = LatentDiffusion.from_pretrained(teacher_folder)
    add_lora(model.unet, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _trained_lora_tensors(unet):
    """{module: (A, B · scale)} of the in-memory student, read from peft's layers directly."""
    out = {}
    for name, module in adapted_modules(unet).items():
        (adapter,) = module.lora_A.keys()
        out[name] = (
            module.lora_A[adapter].weight.detach(),
            module.lora_B[adapter].weight.detach() * module.scaling[adapter],
        )
    return out


def _unet_inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *model.latent_shape), generator=g)
    t = torch.tensor([999.0, 500.0, 21.0])[:batch]
    text = model.encode_prompts(["a photo of a cat", "a red car", ""][:batch])
    return z, t, text


def _export(model, tmp_path):
    return export_lora(model.unet, model.source, 50, tmp_path / "lora", {"test": True})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_exported_lora_loads_completely_in_diffusers(family, tmp_path, parity):
    """(a) every trained adapter arrives, with the trained tensors; (b) the UNet computes what the student computes."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    build = build_tiny_sdxl if family == "sdxl" else build_tiny_sd
    teacher = build(tmp_path / "teacher")
    student = _trained_lora_student(teacher)
    trained = _trained_lora_tensors(student.unet)
    assert any(".attn1.to_q" in n for n in trained) and any(".attn2.to_out.0" in n for n in trained)
    out = _export(student, tmp_path)

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline.from_pretrained(teacher)
    pipe.load_lora_weights(out)
    loaded = _trained_lora_tensors(pipe.unet)
    assert set(loaded) == set(trained), sorted(set(trained) ^ set(loaded))[:5]
    for name, (a, b) in trained.items():
        assert torch.equal(loaded[name][0], a), name
        torch.testing.assert_close(loaded[name][1], b, rtol=1e-6, atol=0, msg=name)

    z, t, text = _unet_inputs(student)
    with torch.no_grad():
        ours = student.unet_output(z, t, text)
        theirs = student.with_network(pipe.unet).unet_output(z, t, text)
    bare = student.with_network(LatentDiffusion.from_pretrained(teacher).unet).unet_output(z, t, text)
    assert (ours - bare).abs().max() > 1e-2  # the LoRA matters, so equality below means something
    parity(theirs, ours, tol=1e-5, label=f"lora-export-{family}")


def test_fused_and_full_exports_compute_the_in_memory_student(tiny_sd, tmp_path, parity):
    """(b) for the merged LoRA folder and for a full w-conditioned student, at several (z, t, w)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    teacher = tiny_sd
    student = _trained_lora_student(teacher)
    z, t, text = _unet_inputs(student)
    with torch.no_grad():
        ours = student.unet_output(z, t, text)
    fused = copy.deepcopy(student.unet)
    fused.fuse_lora()
    fused.unload_lora()
    folder = export_lcm_folder(teacher, fused, student.scheduler_config, 50, tmp_path / "fused", {})
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        parity(student.with_network(pipe.unet).unet_output(z, t, text), ours, tol=1e-4, label="fused-lora-export")

    full = full_student(LatentDiffusion.from_pretrained(teacher).unet)
    with torch.no_grad():
        full.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    folder = export_lcm_folder(teacher, full, student.scheduler_config, 50, tmp_path / "full", {})
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for w in (1.0, 4.0, 8.0):
        emb = w_embedding(torch.full((3,), w), full.config.time_cond_proj_dim)
        with torch.no_grad():
            ref = student.with_network(full.eval()).unet_output(z, t, text, emb)
            parity(student.with_network(pipe.unet).unet_output(z, t, text, emb), ref, tol=1e-5, label="full-export")


def _png(path):
    return torch.from_numpy(np.asarray(Image.open(path))).int()


def test_lcm_sample_draws_the_in_memory_student(tiny_sd, tmp_path, capsys):
    """(c) ``lcm sample`` on the exported LoRA folder draws the pixels the in-memory student draws."""
    teacher = tiny_sd
    student = _trained_lora_student(teacher)
    out = _export(student, tmp_path)
    steps = json.loads((out / "lcm_lora.json").read_text())["original_inference_steps"]
    student.scheduler_config = lcm_scheduler_config(student.scheduler_config, steps)  # as the in-memory task samples
    student.__post_init__()
    prompts, seeds = ["a photo of a cat", "a red car"], [0, 1, 0, 1]
    images = generate(student, [p for p in prompts for _ in range(2)], Sampler.LCM, 2, 0.0, seeds)
    args = ["sample", "--model", str(out), "--steps", "2", "--num-images", "2", "--scale", "1"]
    args += ["--prompt", prompts[0], "--prompt", prompts[1], "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    reference = torch.from_numpy(to_uint8(images)).int()  # [N, H, W, C], the in-memory student's pixels
    for i, seed in enumerate(seeds):
        drawn = _png(tmp_path / "cli" / f"{i:03d}-seed{seed}.png")
        assert (drawn - reference[i]).abs().max() <= 1, i


# --- LoRA files made elsewhere -----------------------------------------------------------------------------------
def _foreign_lora(unet, seed=3, rank=2):
    """{module: (A, B, alpha)} for every Linear / Conv2d that LCM-LoRA targets in ``unet``."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in unet.named_modules():
        if not name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj")):
            continue
        if isinstance(m, torch.nn.Linear):
            a, b = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        elif isinstance(m, torch.nn.Conv2d):
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        else:
            continue
        layers[name] = (a * 0.2, b * 0.2, 1.0)  # alpha 1, rank 2: scale 0.5
    return layers


def _merge_by_hand(unet, layers, scale=1.0):
    """W + scale · (alpha / rank) · B A, written here without peft or diffusers."""
    with torch.no_grad():
        modules = dict(unet.named_modules())
        for name, (a, b, alpha) in layers.items():
            delta = (b.flatten(1) @ a.flatten(1)).view_as(modules[name].weight) * alpha / a.shape[0]
            modules[name].weight += scale * delta
    return unet


def _write_kohya(layers, path):
    from safetensors.torch import save_file

    state = {}
    for name, (a, b, alpha) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)


def _write_diffusers_old(layers, path):
    """diffusers' attention-processor naming (``…lora.down.weight``), alpha folded into up."""
    from safetensors.torch import save_file

    state = {}
    for name, (a, b, alpha) in layers.items():
        state[f"unet.{name}.lora.down.weight"] = a
        state[f"unet.{name}.lora.up.weight"] = b * alpha / a.shape[0]
    save_file(state, path)


def _write_mixed(layers, path):
    """peft naming for some modules and the old naming for attention (what this project once exported)."""
    from safetensors.torch import save_file

    state = {}
    for name, (a, b, alpha) in sorted(layers.items(), key=lambda kv: ".to_" in kv[0]):
        up = b * alpha / a.shape[0]
        if ".to_" in name:
            state[f"unet.{name}.lora.down.weight"], state[f"unet.{name}.lora.up.weight"] = a, up
        else:
            state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = a, up
    save_file(state, path)


@pytest.mark.parametrize("naming", ["kohya", "diffusers-old", "mixed"])
def test_foreign_lora_files_apply_completely(tiny_sd, naming, tmp_path, parity):
    teacher = tiny_sd
    model = LatentDiffusion.from_pretrained(teacher)
    layers = _foreign_lora(model.unet)
    writer = {"kohya": _write_kohya, "diffusers-old": _write_diffusers_old, "mixed": _write_mixed}[naming]
    writer(layers, tmp_path / "lora.safetensors")

    loaded = LatentDiffusion.from_pretrained(teacher, loras=[LoraSpec(str(tmp_path / "lora.safetensors"), 0.7)])
    assert set(adapted_modules(loaded.unet)) == set(layers)
    assert loaded.is_lcm  # a LoRA given to sample is an LCM-LoRA: the model samples on LCM-LoRA's N = 50 grid
    reference = _merge_by_hand(LatentDiffusion.from_pretrained(teacher).unet, layers, scale=0.7)
    z, t, text = _unet_inputs(model)
    with torch.no_grad():
        parity(
            model.with_network(loaded.unet).unet_output(z, t, text),
            model.with_network(reference).unet_output(z, t, text),
            1e-4,
            naming,
        )


def test_lcm_sample_with_lora_flag(tiny_sd, tmp_path, capsys):
    teacher = tiny_sd
    model = LatentDiffusion.from_pretrained(teacher)
    _write_kohya(_foreign_lora(model.unet), tmp_path / "kohya.safetensors")
    args = ["sample", "--model", str(teacher), "--prompt", "a cat", "--num-images", "1", "--steps", "2"]
    assert main([*args, "--lora", str(tmp_path / "kohya.safetensors"), "--out", str(tmp_path / "a.png")]) == 0
    assert "lcm, 2 steps" in capsys.readouterr().out
    assert main([*args, "--lora-scale", "0.5", "--out", str(tmp_path / "b.png")]) == 2
    assert "--lora-scale needs --lora" in capsys.readouterr().err
    assert main([*args, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "c.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_lora_for_another_unet_is_refused(tiny_sd, tmp_path, capsys):
    from safetensors.torch import save_file

    teacher = tiny_sd
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    save_file(
        {"unet.mid_block.nonexistent.to_q.lora_A.weight": a, "unet.mid_block.nonexistent.to_q.lora_B.weight": b},
        tmp_path / "x.safetensors",
    )
    with pytest.raises(ValueError, match="do not exist in this UNet"):
        LatentDiffusion.from_pretrained(teacher, loras=[LoraSpec(str(tmp_path / "x.safetensors"))])


def test_pickled_weights_are_refused_unless_allowed(tiny_sd, tmp_path, capsys, monkeypatch):
    """A model folder holding only ``.bin`` weights is refused in one line; ``lcm --allow-pickle`` loads it."""
    teacher = tiny_sd
    unet = LatentDiffusion.from_pretrained(teacher, with_text_encoder=False).unet
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(teacher / "unet", safe_serialization=False)
    monkeypatch.delenv("LCM_ALLOW_PICKLE", raising=False)
    args = ["sample", "--model", str(teacher), "--prompt", "a cat", "--num-images", "1", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (library warnings may come before it)
    assert last.startswith("lcm sample: error:") and "no .safetensors weights" in last and "--allow-pickle" in last
    assert main(["--allow-pickle", *args, "--sampler", "ddim", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").is_file()
