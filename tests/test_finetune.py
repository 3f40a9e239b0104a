"""LCF: the step against a hand-computed reference, ``lcm finetune`` end to end on a tiny folder dataset, the LCM's
own defaults, and a teacher whose w input is not the default size."""

import copy
import json

import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.maths.guidance import w_embedding
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import StudentKind, full_student
from lcm.training.lcf import LCF, LCFConfig
from tiny_models import build_tiny_sd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcf")
    teacher = build_tiny_sd(root / "teacher")
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(6):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a drawing of a dog {i}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    lcm = root / "lcm"
    args = ["distill", "--teacher", str(teacher), "--data", str(images), "--out", str(lcm), "--max-steps", "2"]
    assert main([*args, "--batch-size", "2", "--validate-every", "0"]) == 0
    return teacher, images, lcm


def test_lcf_step_equals_hand_computed_reference(folders):
    _, _, lcm = folders
    model = LatentDiffusion.from_pretrained(lcm)
    assert model.is_lcm
    student = full_student(model.unet)
    target = copy.deepcopy(student)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01)
    cfg = LCFConfig(w=4.0, huber_c=0.01)
    lcf = LCF(model, student, StudentKind.FULL, cfg, target)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    cond = model.encode_prompts(["a dog", "a cat"])
    ours = lcf.loss(z0, cond, None, torch.Generator().manual_seed(5)).loss

    g = torch.Generator().manual_seed(5)  # the same draws, written out
    s = (torch.arange(1, 51) * 20 - 1)[torch.randint(0, 50, (2,), generator=g)]
    t = (s - 20).clamp(min=0)
    eps = torch.randn(z0.shape, generator=g)
    ac = model.schedule.alphas_cumprod.float()
    emb = w_embedding(torch.full((2,), 4.0))

    def f(unet, tt):
        a, sg = ac[tt].sqrt().view(-1, 1, 1, 1), (1 - ac[tt]).sqrt().view(-1, 1, 1, 1)
        z = a * z0 + sg * eps  # the same ε at both ends: consistency *training*
        out = unet(z, tt.float(), encoder_hidden_states=cond.hidden_states, timestep_cond=emb).sample
        x0 = (z - sg * out) / a
        scaled = tt.double() * 10
        c_skip = (0.25 / (scaled**2 + 0.25)).float().view(-1, 1, 1, 1)
        c_out = (scaled / (scaled**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)
        return c_skip * z + c_out * x0

    d2 = (f(student, s) - f(target, t).detach()) ** 2
    ref = (torch.sqrt(d2 + 0.01**2) - 0.01).flatten(1).mean(1)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-7)


def test_finetune_refuses_a_teacher(folders, capsys):
    teacher, images, _ = folders
    args = ["finetune", "--model", str(teacher), "--data", str(images), "--out", "/tmp/never", "--max-steps", "1"]
    assert main(args) == 2
    assert "needs an LCM" in capsys.readouterr().err


@pytest.mark.parametrize("student", ["full", "lora"])
def test_finetune_cli_runs_and_exports_for_diffusers(folders, tmp_path, student):
    from diffusers import LatentConsistencyModelPipeline

    _, images, lcm = folders
    out = tmp_path / "lcf"
    args = ["finetune", "--model", str(lcm), "--data", str(images), "--out", str(out), "--max-steps", "2"]
    args += ["--batch-size", "2", "--student", student, "--lora-rank", "4", "--validate-every", "0"]
    assert main(args) == 0
    provenance = json.loads((out / ("lcm_distill.json" if student == "full" else "lcm_lora.json")).read_text())
    assert provenance["method"] == "LCF"
    source = LatentDiffusion.from_pretrained(lcm)  # no --lcf-w: the LCM's own default w, the middle of [2, 14]
    assert provenance["lcf"]["w"] == source.default_w == 8.0
    assert provenance["consistency"] == {"sigma_data": source.sigma_data, "timestep_scaling": source.timestep_scaling}
    if student == "full":
        pipe = LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    else:
        pipe = LatentConsistencyModelPipeline.from_pretrained(lcm, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    images_out = pipe(["a dog"], num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert images_out.shape == (1, 64, 64, 3)
    assert (
        main(
            ["sample", "--model", str(out), "--prompt", "a dog", "--num-images", "1", "--out", str(tmp_path / "g.png")]
        )
        == 0
    )


def _teacher_with_w_input(folder, dim: int):
    """A tiny SD folder whose UNet already takes a w-embedding of ``dim`` (not the 256 of a new student)."""
    from diffusers import UNet2DConditionModel

    build_tiny_sd(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    wide = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = wide.load_state_dict(unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    wide.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def test_w_embedding_has_the_unets_own_size(folders, tmp_path):
    _, images, _ = folders
    teacher = _teacher_with_w_input(tmp_path / "teacher512", 512)
    common = ["--data", str(images), "--max-steps", "2", "--batch-size", "2", "--validate-every", "0"]
    distilled = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(teacher), "--out", str(distilled), *common]) == 0
    assert LatentDiffusion.from_pretrained(distilled).unet.config.time_cond_proj_dim == 512
    assert main(["finetune", "--model", str(teacher), "--out", str(tmp_path / "lcf"), *common]) == 0


def test_lcf_defaults_are_the_lcms_own(folders, tmp_path):
    """Unset w and consistency constants of LCF come from the LCM; LCD's constants reach its export."""
    from lcm.config import LCDConfig, StudentConfig
    from lcm.models.formats import read_record
    from lcm.training.task import DistillTask, FinetuneTask

    teacher, _, _ = folders
    lcd = LCDConfig(w_min=1.0, w_max=5.0, sigma_data=0.3, timestep_scaling=5.0)
    DistillTask(LatentDiffusion.from_pretrained(teacher), lcd).export(tmp_path / "lcm")
    record = read_record(tmp_path / "lcm")
    assert (record["sigma_data"], record["timestep_scaling"], record["w_range"]) == (0.3, 5.0, (1.0, 5.0))

    model = LatentDiffusion.from_pretrained(tmp_path / "lcm")
    task = FinetuneTask(model, LCFConfig(), StudentConfig(kind="lora"))
    assert (task.cfg.w, task.cfg.sigma_data, task.cfg.timestep_scaling) == (3.0, 0.3, 5.0)
    assert task.validation_w == model.default_w == 3.0
    task.export(tmp_path / "lora")
    record = read_record(tmp_path / "lora")
    assert (record["sigma_data"], record["timestep_scaling"], record["w_range"]) == (0.3, 5.0, (3.0, 3.0))
    explicit = FinetuneTask(LatentDiffusion.from_pretrained(tmp_path / "lcm"), LCFConfig(w=1.5))
    assert (explicit.cfg.w, explicit.validation_w) == (1.5, 1.5)
