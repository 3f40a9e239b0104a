"""TCD and PCM on the LCD loop: each reduces to the LCM's loss where it should, maps where its paper says, and what
it exports samples in diffusers with the scheduler its authors use."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lcm.training.lcd as lcd_module
from lcm.cli import main
from lcm.config import Consistency, LCDConfig, StudentKind
from lcm.evaluation.plan import _methods
from lcm.maths.timesteps import SkippingGrid, phase_edge_below, trajectory_targets
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.training.lcd import LCD


def _losses(tiny_sd, seed=7, **settings):
    """The per-sample LCD loss of one batch under ``settings``, from the same student, target, batch and draws."""
    model = LatentDiffusion.from_pretrained(tiny_sd)
    student = full_student(model.unet)
    with torch.no_grad():  # a w input that matters, and a target that is not the student
        student.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    target = copy.deepcopy(student)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1e-3)
    method = LCD(model, student, StudentKind.FULL, LCDConfig(num_solver_steps=10, **settings), target)
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = model.encode_prompts(["a", "b", "c", "d"]), model.encode_prompts([""] * 4)
    with torch.no_grad():
        return method.loss(z0, cond, uncond, torch.Generator().manual_seed(seed)).loss


def test_tcd_with_s_at_zero_and_pcm_with_one_phase_are_the_lcm_loss(tiny_sd, monkeypatch):
    lcm = _losses(tiny_sd)
    assert torch.equal(_losses(tiny_sd, consistency=Consistency.PCM, phases=1), lcm)
    tcd = _losses(tiny_sd, consistency=Consistency.TCD)
    assert not torch.allclose(tcd, lcm)  # its own targets: another loss
    monkeypatch.setattr(lcd_module, "trajectory_targets", lambda t_end, grid, generator: torch.zeros_like(t_end))
    assert torch.equal(_losses(tiny_sd, consistency=Consistency.TCD), lcm)
    assert not torch.allclose(_losses(tiny_sd, consistency=Consistency.PCM, phases=2), lcm)


def _cfg_free_losses(tiny_sd, cond_prompts=("a", "b", "c", "d"), **settings):
    """The per-sample LCD loss of one batch from a full student whose w projection is zero (so the w-embedding
    adds exactly nothing): guided at w = 0 and CFG-free must then meet."""
    model = LatentDiffusion.from_pretrained(tiny_sd)
    student = full_student(model.unet)
    target = copy.deepcopy(student)
    with torch.no_grad():
        for name, p in target.named_parameters():
            p.add_(0 if "cond_proj" in name else 1e-3)
    method = LCD(model, student, StudentKind.FULL, LCDConfig(num_solver_steps=10, **settings), target)
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = model.encode_prompts(list(cond_prompts)), model.encode_prompts([""] * 4)
    with torch.no_grad():
        return method.loss(z0, cond, uncond, torch.Generator().manual_seed(7)).loss


def test_cfg_free_distillation_is_unguided_lcd_with_caption_dropout(tiny_sd):
    """CFG-free without caption dropout is LCD at w = 0 (the teacher's conditional ODE); with every caption dropped
    it is the same loss on empty prompts; a guided teacher (w = 3) gives another loss."""
    free = _cfg_free_losses(tiny_sd, cfg_free=True, caption_dropout=0.0)
    torch.testing.assert_close(free, _cfg_free_losses(tiny_sd, w_min=0.0, w_max=0.0), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(free, _cfg_free_losses(tiny_sd, w_min=3.0, w_max=3.0), rtol=1e-3)
    dropped = _cfg_free_losses(tiny_sd, cfg_free=True, caption_dropout=1.0)
    assert torch.equal(dropped, _cfg_free_losses(tiny_sd, [""] * 4, cfg_free=True, caption_dropout=0.0))
    assert not torch.allclose(dropped, free, rtol=1e-3)


def test_phase_edges_and_trajectory_targets():
    grid = SkippingGrid(10, 1000)  # k = 100: 99, 199, ..., 999
    t = torch.tensor([99, 199, 499, 599, 999])
    assert phase_edge_below(t, grid, 1).tolist() == [0, 0, 0, 0, 0]
    assert phase_edge_below(t, grid, 2).tolist() == [0, 0, 0, 499, 499]
    assert phase_edge_below(t, grid, 5).tolist() == [0, 0, 399, 399, 799]
    with pytest.raises(ValueError, match="must divide"):
        phase_edge_below(t, grid, 3)
    t_end = torch.tensor([0, 99, 499] * 2000)
    s = trajectory_targets(t_end, grid, torch.Generator().manual_seed(0))
    for end in (0, 99, 499):
        drawn = s[t_end == end]
        expected = {0, *range(99, end + 1, 100)}
        assert set(drawn.tolist()) == expected and (drawn <= end).all()  # every grid point at or below t_n, and 0
        counts = torch.bincount((drawn + 1) // 100)
        assert counts.min() > 0.8 * counts.float().mean()  # uniform


def test_target_times_stay_on_the_batchs_device():
    """TCD's and PCM's target times for timesteps on an accelerator, drawn with the loop's CPU generator: no CPU
    tensor meets the accelerator's (the "meta" device stands in for CUDA: mixing it with the CPU fails alike)."""
    grid = SkippingGrid(10, 1000)
    t = torch.tensor([99, 499, 999]).to("meta")
    assert trajectory_targets(t, grid, torch.Generator().manual_seed(0)).device.type == "meta"
    assert phase_edge_below(t, grid, 2).device.type == "meta"


def test_the_trajectory_function_is_ddims_jump_and_keeps_its_boundaries(tiny_sd):
    """f(z, t → s) against diffusers' DDIMScheduler.step (η = 0) from t to s; f(z, t → t) = z; f(z, t → 0) is the
    LCM's consistency output."""
    from diffusers import DDIMScheduler

    model = LatentDiffusion.from_pretrained(tiny_sd)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = model.encode_prompts(["a cat", "a dog"])
    t = torch.tensor([999, 999])
    with torch.no_grad():
        out = model.trajectory_output(z, t, torch.tensor([499, 499]), text, None)
        scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler", timestep_spacing="trailing")
        scheduler.set_timesteps(2)
        assert scheduler.timesteps.tolist() == [999, 499]
        eps = model.unet(z, 999, encoder_hidden_states=text.hidden_states).sample
        ddim = scheduler.step(eps, 999, z, eta=0.0).prev_sample
        torch.testing.assert_close(out, ddim, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.trajectory_output(z, t, t, text, None), z)
        torch.testing.assert_close(
            model.trajectory_output(z, t, torch.zeros_like(t), text, None),
            model.consistency_output(z, t, text, None),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("method, cfg_free", [("pcm", False), ("tcd", False), ("pcm", True)])
def test_a_distilled_pcm_or_tcd_samples_in_diffusers_with_tcd_scheduler(
    method, cfg_free, tiny_sd, captioned_images, tmp_path
):
    """``lcm distill --method pcm --phases 2`` (or tcd) exports a model that records its method; ``lcm sample``
    draws with TCD's sampler (γ = 0 and the phases' steps for PCM), and diffusers' pipeline with TCDScheduler at the
    same γ and steps draws the same pixels. ``--cfg-free``: a UNet without a w input, which both sample with real
    classifier-free guidance, ``guidance_scale`` = 1 + w against the empty negative prompt."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    out = tmp_path / method
    args = ["distill", "--teacher", str(tiny_sd), "--data", str(captioned_images), "--out", str(out), "--method"]
    args += [method, "--num-solver-steps", "10", "--max-steps", "2", "--batch-size", "2", "--validate-every", "0"]
    args += ["--phases", "2"] if method == "pcm" else []
    assert main([*args, *(["--cfg-free", "--caption-dropout", "0.5"] if cfg_free else [])]) == 0
    record = json.loads((out / "lcm_distill.json").read_text())["lcd"]
    assert (record["consistency"], record["cfg_free"]) == (method, cfg_free)
    model = LatentDiffusion.from_pretrained(out)
    assert model.cfg_free == cfg_free and (model.unet.config.time_cond_proj_dim is None) == cfg_free
    if cfg_free:
        sample = ["sample", "--model", str(out), "--prompt", "a cat", "--negative-guidance", "1"]
        assert main([*sample, "--out", str(tmp_path / "refused")]) == 2
    steps, gamma = (2, 0.0) if method == "pcm" else (4, 0.3)
    assert (model.default_sampler.value, model.default_steps, model.default_gamma) == ("tcd", steps, gamma)
    sample = ["sample", "--model", str(out), "--prompt", "a cat", "--num-images", "2"]
    assert main([*sample, "--out", str(tmp_path / "s")]) == 0
    info = Image.open(tmp_path / "s" / "000-seed0.png").info
    assert (info["sampler"], int(info["steps"])) == ("tcd", steps)
    cases = [(tmp_path / "s", steps, gamma)]
    if method == "pcm":  # also off the phase edges, at the γ that tracks the teacher's w (docs/methods.md)
        assert main([*sample, "--steps", "4", "--gamma", "0.05", "--out", str(tmp_path / "g")]) == 0
        cases.append((tmp_path / "g", 4, 0.05))

    (evaluated,) = _methods(str(tiny_sd), (), (1,), [(str(out), None)], (1, 2))  # what lcm eval --lcm OUT rows
    assert (evaluated.name, evaluated.sampler.value) == (method.upper(), "tcd")

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    w = model.default_w
    for folder, steps, gamma in cases:
        for seed in (0, 1):
            image = pipe(
                "a cat", num_inference_steps=steps, guidance_scale=w + 1, eta=gamma, output_type="np",
                generator=torch.Generator().manual_seed(seed),
            ).images[0]  # fmt: skip
            ours = np.asarray(Image.open(folder / f"00{seed}-seed{seed}.png")).astype(int)
            theirs = np.round(image * 255).astype(int)
            theirs = theirs[..., 0] if ours.ndim == 2 else theirs
            assert np.abs(ours - theirs).max() <= 1, (folder.name, seed, np.abs(ours - theirs).max())


def test_method_settings_are_checked(tiny_sd, captioned_images, tmp_path, capsys):
    args = ["distill", "--teacher", str(tiny_sd), "--data", str(captioned_images), "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--method", "pcm", "--phases", "3", "--num-solver-steps", "10"], "--phases must divide"),
        (["--phases", "2"], "--phases is PCM's: add --method pcm"),
        (["--method", "tcd", "--coarse-num-solver-steps", "10"], "draws its targets on one grid"),
    ):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (extra, err)
    with pytest.raises(SystemExit):  # argparse names the choices
        main([*args, "--method", "dmd"])
    assert "invalid choice: 'dmd' (choose from 'lcm', 'tcd', 'pcm')" in capsys.readouterr().err


def test_every_row_of_the_methods_script_is_a_valid_run_config(tmp_path):
    """scripts/methods.py's rows are dotted overrides of its recipes: each must build a run-config tree (a mistyped
    key or value fails here, not an hour into a table); a second stage starts from its first stage's run of the
    same seed, or the shipped LCM, and refuses to start without it."""
    import runpy

    from lcm.config.recipes import recipe_config
    from lcm.shipped import ASSETS

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "methods.py"))
    methods, second = script["METHODS"], script["SECOND"]
    with pytest.raises(SystemExit, match="make it first"):
        script["changes"]("tcd+adv1>dmd5", 1, tmp_path)
    for base, _ in second.values():
        if base != script["SHIPPED"]:
            (tmp_path / f"{base}-s1" / "unet").mkdir(parents=True, exist_ok=True)
    with pytest.raises(SystemExit, match="lcm pairs"):
        script["changes"]("shipped>lcm+reg1-3k", 1, tmp_path)
    (tmp_path / script["PAIRS_FILE"]).touch()
    for name in methods:
        cfg = recipe_config("demo-1500", script["changes"](name, 1, tmp_path))
        assert cfg.loop.seed == 1, name
        if name in second:
            base = second[name][0]
            first = ASSETS / "fashion-lcm" if base == script["SHIPPED"] else tmp_path / f"{base}-s1"
            assert cfg.method.init_student == str(first), name
            assert cfg.loop.max_steps == {"-1k": 1000, "-3k": 3000, "-6k": 6000}.get(name[-3:], 300), name
            regression = cfg.method.regression_weight > 0
            assert cfg.method.regression_pairs == (str(tmp_path / script["PAIRS_FILE"]) if regression else None)
            assert cfg.optim.lr_warmup_steps == cfg.loop.max_steps // 10, name
        else:
            assert cfg.method.init_student is None and cfg.loop.max_steps == 1500, name


def test_the_methods_report_is_remade_from_kept_records_once_the_runs_are_gone(tmp_path):
    """scripts/methods.py --docs keeps every run's rows (no weights) in DOCS/records/NAME and makes the report from
    there: deleting the run folders loses no row, and a run's partial results.json (still being evaluated) does not
    replace its whole kept record."""
    import runpy
    import shutil

    from lcm.evaluation.plan import EvalSettings
    from lcm.evaluation.results import Record, load_results, save_results

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "methods.py"))
    settings = EvalSettings(num_samples=8)

    def write(folder: Path, method: str, fds: dict[int, float]) -> None:
        records = [
            Record(method, str(folder), "-", "lcm", steps, 3.0, {"fd_clf": fd, "prompt_accuracy": 0.5}, 8, 0.1, steps,
                   None, "0", "2026-01-01")
            for steps, fd in fds.items()
        ]  # fmt: skip
        save_results(folder / "results.json", settings, records)

    out, docs = tmp_path / "runs", tmp_path / "docs"
    write(out / "teacher", "TEACHER", {25: 55.0})
    write(out / "lcm-s0", "LCM", {1: 200.0, 2: 70.0, 4: 66.0, 8: 68.0})
    write(out / "lcm-s1", "LCM", {1: 210.0, 2: 72.0, 4: 70.0, 8: 72.0})
    records = script["keep_records"](out, docs / "records" / "methods_long")
    shutil.rmtree(out)
    text = script["document"](records, "long", "methods_long.png")
    assert "| lcm | 2 | 205.0 ± 5.0 | 71.0 ± 1.0 | 68.0 ± 2.0 | 70.0 ± 2.0 |" in text, text
    assert "**55.0**" in text
    write(out / "lcm-s1", "LCM", {1: 999.0})  # a new run of the same seed, evaluated at 1 step so far
    script["keep_records"](out, records)
    assert len(load_results(records / "lcm-s1" / "results.json")[1]) == 4
    write(out / "lcm-s1", "LCM", {1: 209.0, 2: 72.0, 4: 70.0, 8: 72.0})  # ... and whole: it replaces the record
    script["keep_records"](out, records)
    assert "| lcm | 2 | 204.5 ± 4.5 |" in script["document"](records, "long", "methods_long.png")
