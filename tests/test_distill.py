"""The LCD step against a hand-computed reference, EMA by name, exact resume (loop and ``lcm distill --resume``),
and target/student set-up."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lcm.cli import main
from lcm.config import LoopConfig, OptimConfig
from lcm.maths.ema import ema_update
from lcm.maths.guidance import w_embedding
from lcm.maths.solvers import Solver
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import StudentKind, add_lora, full_student
from lcm.training.lcd import LCD, LCDConfig
from lcm.training.loop import train
from tiny_models import build_tiny_sd, tiny_unet


@pytest.fixture(scope="module")
def sd_folder(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def sd_v_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sdv"), "v_prediction", seed=3)


def _batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, *model.latent_shape, generator=g)
    cond = model.encode_prompts(["a photo of a cat", "a red car", "a dog"][:n])
    uncond = model.encode_prompts([""] * n)
    return z0, cond, uncond


def _perturb(unet, seed=1):
    """Make student ≠ teacher so the reference exercises every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def _hand_reference(model, student, target, teacher, z0, cond, uncond, cfg, seed):
    """LCD written out from the paper's equations with the same random draws, independently of lcm.maths.solvers."""
    g = torch.Generator().manual_seed(seed)
    n = z0.shape[0]
    k = 1000 // cfg.num_solver_steps
    grid = torch.arange(1, cfg.num_solver_steps + 1) * k - 1
    s = grid[torch.randint(0, cfg.num_solver_steps, (n,), generator=g)]  # t_{n+k}
    t = (s - k).clamp(min=0)  # t_n
    eps = torch.randn(z0.shape, generator=g)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(n, generator=g)
    ac = model.schedule.alphas_cumprod

    def a_s(tt):  # α, σ as [B,1,1,1] float32 at integer or real timesteps
        la = model.schedule.log_alpha(tt)
        return la.exp().float().view(-1, 1, 1, 1), (1 - (2 * la).exp()).sqrt().float().view(-1, 1, 1, 1)

    assert torch.allclose(a_s(s)[0].flatten() ** 2, ac[s].float())
    a, sg = a_s(s)
    z = a * z0 + sg * eps

    def unet_out(unet, zz, tt, text, emb=None):
        return unet(zz, tt.float(), encoder_hidden_states=text.hidden_states, timestep_cond=emb).sample

    def x0_eps(out, zz, tt):
        aa, ss = a_s(tt)
        if model.prediction_type.value == "epsilon":
            return (zz - ss * out) / aa, out
        return aa * zz - ss * out, ss * zz + aa * out  # v

    def f(unet, zz, tt, emb):
        scaled = tt.double() * 10.0
        c_skip = (0.25 / (scaled**2 + 0.25)).float().view(-1, 1, 1, 1)
        c_out = (scaled / (scaled**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)
        return c_skip * zz + c_out * x0_eps(unet_out(unet, zz, tt, cond, emb), zz, tt)[0]

    def guided(zz, tt):
        oc, ou = unet_out(teacher, zz, tt, cond), unet_out(teacher, zz, tt, uncond)  # two separate calls here
        out = oc + w.view(-1, 1, 1, 1) * (oc - ou)
        return x0_eps(out, zz, tt)

    emb = w_embedding(w) if student.config.get("time_cond_proj_dim") else None
    pred = f(student, z, s, emb)
    with torch.no_grad():
        at, st = a_s(t)
        if cfg.solver is Solver.DDIM:
            x0, e = guided(z, s)
            z_t = at * x0 + st * e
        else:
            lam = lambda tt: model.schedule.lambda_(tt)  # noqa: E731
            u = model.schedule.t_of_lambda((lam(s) + lam(t)) / 2)
            au, su = a_s(u)
            h = (lam(t) - lam(s)).float().view(-1, 1, 1, 1)
            if cfg.solver is Solver.DPM_SOLVER_2:  # DPM-Solver-2, noise form
                z_u = (au / a) * z - su * torch.expm1(h / 2) * guided(z, s)[1]
                z_t = (at / a) * z - st * torch.expm1(h) * guided(z_u, u)[1]
            else:  # DPM-Solver++(2S), data form
                z_u = (su / sg) * z - au * torch.expm1(-h / 2) * guided(z, s)[0]
                z_t = (st / sg) * z - at * torch.expm1(-h) * guided(z_u, u)[0]
        tgt = f(target, z_t, t, emb)
    d2 = (pred - tgt) ** 2
    return (torch.sqrt(d2 + cfg.huber_c**2) - cfg.huber_c).flatten(1).mean(1)


@pytest.mark.parametrize("solver", [s for s in Solver if not s.flow_only])
@pytest.mark.parametrize("which", ["sd", "sd_v"])
def test_lcd_step_equals_hand_computed_reference(solver, which, request):
    folder = request.getfixturevalue(f"{which}_folder")
    model = LatentDiffusion.from_pretrained(folder)
    student = full_student(model.unet)
    _perturb(student)
    target = copy.deepcopy(student)
    _perturb(target, seed=2)
    cfg = LCDConfig(num_solver_steps=50, solver=solver, w_min=2, w_max=8, huber_c=0.01)
    lcd = LCD(model, student, StudentKind.FULL, cfg, target)
    z0, cond, uncond = _batch(model)
    ours = lcd.loss(z0, cond, uncond, torch.Generator().manual_seed(7)).loss
    ref = _hand_reference(model, student, target, model.unet, z0, cond, uncond, cfg, seed=7)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-7)
    ours.mean().backward()  # gradients reach the student only
    assert student.conv_in.weight.grad is not None and target.conv_in.weight.grad is None


def test_lora_lcd_step_uses_adapter_free_teacher(sd_folder):
    model = LatentDiffusion.from_pretrained(sd_folder)
    teacher = copy.deepcopy(model.unet)
    student = add_lora(model.unet, rank=4)
    with torch.no_grad():  # non-zero B so that adapters change the output
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    cfg = LCDConfig(solver=Solver.DPM_SOLVER_PP_2S, w_min=3, w_max=3)
    lcd = LCD(model, student, StudentKind.LORA, cfg)
    z0, cond, uncond = _batch(model, n=2)
    ours = lcd.loss(z0, cond, uncond, torch.Generator().manual_seed(3)).loss
    ref = _hand_reference(model, student, student, teacher, z0, cond, uncond, cfg, seed=3)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-7)
    assert all(p.requires_grad == ("lora" in n) for n, p in student.named_parameters())


def test_full_student_starts_equal_to_teacher(sd_folder):
    model = LatentDiffusion.from_pretrained(sd_folder)
    student = full_student(model.unet)
    assert student.config.time_cond_proj_dim == 256
    assert torch.all(student.time_embedding.cond_proj.weight == 0)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    ctx = model.encode_prompts(["a cat", ""]).hidden_states
    with torch.no_grad():
        ref = model.unet(z, t, encoder_hidden_states=ctx).sample
        out = student(z, t, encoder_hidden_states=ctx, timestep_cond=w_embedding(torch.tensor([3.0, 9.0]))).sample
    torch.testing.assert_close(out, ref)


def test_full_student_of_a_unet_built_in_memory():
    """diffusers' from_config lists unset keys in ``_use_default_values`` and drops them when the config is reused: the
    student's ``time_cond_proj_dim`` must survive that (a teacher built in memory, not loaded from a folder)."""
    from diffusers import UNet2DConditionModel

    keys = ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "norm_num_groups")
    teacher = UNet2DConditionModel.from_config(
        {k: tiny_unet().config[k] for k in ("sample_size", "layers_per_block", *keys)}
    )
    assert "time_cond_proj_dim" in teacher.config.get("_use_default_values", [])
    student = full_student(teacher)
    assert student.config.time_cond_proj_dim == 256
    assert torch.all(student.time_embedding.cond_proj.weight == 0)


def test_lcd_config_validation():
    with pytest.raises(ValueError, match="--w-min must not exceed --w-max"):
        LCDConfig(w_min=5, w_max=2)
    with pytest.raises(ValueError):
        LCDConfig(solver="euler")
    with pytest.raises(ValueError, match="ema-decay"):
        LCDConfig(ema_decay=1.0)


class _Reordered(torch.nn.Module):
    """Same parameter names as _Plain, registered in the opposite order."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(3, 2)
        self.a = torch.nn.Linear(2, 3)


class _Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 3)
        self.b = torch.nn.Linear(3, 2)


def test_ema_matches_parameters_by_name():
    source, target = _Plain(), _Reordered()
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    ema_update(target, source, 0.9)
    src = dict(source.named_parameters())
    for name, p in target.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * src[name])
    ema_update(target, source, 0.0)  # decay 0 copies
    for name, p in target.named_parameters():
        torch.testing.assert_close(p, src[name])
    with pytest.raises(ValueError, match="differ"):
        ema_update(torch.nn.Linear(2, 2), source, 0.5)


class _ListData(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
        self.captions = [f"a photo of a {w}" for w in ("cat", "dog", "red car", "tree")] * (n // 4)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "caption": self.captions[i]}


class _Crash(Exception):
    pass


def _run(folder, out, max_steps, resume=None, crash_after=None, kind=StudentKind.FULL, w_lr_scale=1.0, **lcd):
    from lcm.config import StudentConfig
    from lcm.data.loader import batch_stream
    from lcm.data.sources import collate_skip_none
    from lcm.training.task import DistillTask

    model = LatentDiffusion.from_pretrained(folder)
    cfg = LCDConfig(solver=Solver.DPM_SOLVER_PP_2S, w_min=2, w_max=6, w_lr_scale=w_lr_scale, **lcd)
    task = DistillTask(model, cfg, StudentConfig(kind=kind, lora_rank=4))
    data = _ListData()

    def batches(start):
        for i, b in enumerate(batch_stream(data, 4, collate_skip_none, seed=0, start=start)):
            if crash_after is not None and i == crash_after:
                raise _Crash  # the process dies between steps
            yield b

    loop = LoopConfig(max_steps=max_steps, checkpoint_every=2, validate_every=0, seed=5)
    try:
        train(task, batches, out, loop, OptimConfig(learning_rate=1e-3), resume)
    except _Crash:
        pass
    return task


@pytest.mark.parametrize(
    ("kind", "terms"),
    [
        (StudentKind.FULL, {}),
        (StudentKind.LORA, {}),
        (StudentKind.LORA, {"adversarial_weight": 0.5}),
        (StudentKind.FULL, {"dmd_weight": 0.5, "dmd_lr": 1e-3}),
        (StudentKind.LORA, {"regression_weight": 0.5}),
    ],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(sd_folder, tmp_path, kind, terms):
    """Weights, EMA target and (with --adversarial-weight) the discriminator's heads and AdamW moments, (with
    --dmd-weight) the fake score's weights and moments; (with --regression-weight) the pairs drawn after the crash."""
    settings = {"kind": kind, **terms}
    if "regression_weight" in terms:
        from lcm.training.regression import make_pairs, save_pairs

        about = {"teacher": "sd", "sampler": "dpm", "steps": 2, "w_min": 2.0, "w_max": 6.0, "seed": 1, "prompts": ""}
        teacher = LatentDiffusion.from_pretrained(sd_folder)
        save_pairs(tmp_path / "pairs.safetensors", make_pairs(teacher, [f"p{i}" for i in range(6)], about))
        settings["regression_pairs"] = str(tmp_path / "pairs.safetensors")
    straight = _run(sd_folder, tmp_path / "a", 6, **settings)
    _run(sd_folder, tmp_path / "b", 6, crash_after=5, **settings)  # dies during step 6; checkpoint at step 4
    assert (tmp_path / "b" / "train" / "checkpoints" / "step-4").is_dir()
    assert not (tmp_path / "b" / "train" / "checkpoints" / "step-6").exists()
    resumed = _run(sd_folder, tmp_path / "b", 6, resume="latest", **settings)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert any(k.startswith("adversarial.optim.") for k in a) == ("adversarial_weight" in terms)
    assert any(k.startswith("dmd.optim.") for k in a) == ("dmd_weight" in terms)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    history = (tmp_path / "a" / "train" / "train_history.json").read_text()
    assert "samples_per_second" in history and not math.isnan(straight.state_dict()[next(iter(a))].sum().item())


def test_w_lr_scale_multiplies_only_the_w_projection_step(sd_folder, tmp_path):
    """AdamW's first step moves each weight by lr·m̂/(√v̂+ε): a 10x rate on the w projection moves it exactly 10x as
    far, and every other weight exactly as far as without the option."""
    plain = _run(sd_folder, tmp_path / "plain", 1).student.state_dict()
    scaled = _run(sd_folder, tmp_path / "scaled", 1, w_lr_scale=10.0).student.state_dict()
    name = "time_embedding.cond_proj.weight"
    assert plain[name].abs().max() > 0  # zero-initialised, and it does learn
    torch.testing.assert_close(scaled[name], 10 * plain[name], rtol=1e-5, atol=0)
    for key in plain:
        if key != name:
            torch.testing.assert_close(scaled[key], plain[key], rtol=0, atol=0, msg=key)
    history = json.loads((tmp_path / "scaled" / "train" / "train_history.json").read_text())[-1]
    assert history["w_proj_norm"] == pytest.approx(scaled[name].norm().item(), rel=1e-6)
    assert history["w_proj_grad_norm"] > 0
    assert any(k.startswith("loss_t") for k in history) and any(k.startswith("loss_w") for k in history)


def _recorded_pairs(monkeypatch, grid_class) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of (t_{n+k}, t_n) pairs that ``grid_class.sample`` draws from now on, in order."""
    pairs = []
    sample = grid_class.sample

    def recording(self, batch_size, generator=None):
        pair = sample(self, batch_size, generator)
        pairs.append(pair)
        return pair

    monkeypatch.setattr(grid_class, "sample", recording)
    return pairs


def test_skip_curriculum_draws_coarse_pairs_first_and_a_resumed_run_follows_the_step(sd_folder, tmp_path, monkeypatch):
    """--coarse-steps 3 --coarse-num-solver-steps 5: steps 1-3 draw pairs k = 200 apart, step 4 k = 20 (the
    grid of N = 50 the LCM samples on), and a run resumed from its step-2 checkpoint draws what it would have."""
    from lcm.maths.timesteps import SkippingGrid

    pairs = _recorded_pairs(monkeypatch, SkippingGrid)

    def skips():
        return [int((start - end).max()) for start, end in pairs]

    curriculum = {"coarse_num_solver_steps": 5, "coarse_steps": 3}
    task = _run(sd_folder, tmp_path / "a", 4, **curriculum)
    assert skips() == [200, 200, 200, 20]
    assert task.method.fine_grid.k == 20 and task.method.coarse_grid.k == 200
    pairs.clear()
    _run(sd_folder, tmp_path / "b", 4, crash_after=3, **curriculum)  # dies during step 4; checkpoint at step 2
    pairs.clear()
    _run(sd_folder, tmp_path / "b", 4, resume="latest", **curriculum)
    assert skips() == [200, 20]  # steps 3 and 4
    with pytest.raises(ValueError, match="coarser"):
        LCDConfig(num_solver_steps=10, coarse_num_solver_steps=50, coarse_steps=5)
    with pytest.raises(ValueError, match="coarse-steps"):
        LCDConfig(coarse_steps=5)


def test_mixed_skips_draw_each_pair_on_one_grid_in_the_asked_proportion(sd_folder, tmp_path, monkeypatch):
    """--coarse-fraction p: each pair is a pair of the coarse grid (k = 100) with probability p, else of the fine
    one (k = 20), t_n = t_{n+k} − k of its own grid; after a curriculum, an LCD run draws on both grids."""
    from lcm.maths.timesteps import MixedGrid, SkippingGrid

    draws = 100_000
    fine, coarse = SkippingGrid(50), SkippingGrid(10)
    for p in (0.25, 0.75):
        start, end = MixedGrid(fine, coarse, p).sample(draws, torch.Generator().manual_seed(1))
        skip = start - end  # 100 on the coarse grid, 20 on the fine one; 99 and 19 from its lowest point (t_n = 0)
        on_coarse = (skip == 100) | (skip == 99)
        assert torch.all(on_coarse | (skip == 20) | (skip == 19))
        assert torch.all(torch.isin(start[on_coarse], coarse.timesteps))
        assert torch.all(torch.isin(start[~on_coarse], fine.timesteps))
        assert torch.equal(end, (start - torch.where(on_coarse, 100, 20)).clamp(min=0))
        share = on_coarse.double().mean().item()
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / draws), (p, share)
    with pytest.raises(ValueError, match="fraction"):
        MixedGrid(fine, coarse, 1.5)
    with pytest.raises(ValueError, match="coarse-fraction"):
        LCDConfig(coarse_fraction=0.5)  # needs a coarse grid
    with pytest.raises(ValueError, match="coarse-fraction"):
        LCDConfig(coarse_num_solver_steps=10, coarse_fraction=-0.1)

    pairs = _recorded_pairs(monkeypatch, MixedGrid)
    mixed = {"coarse_num_solver_steps": 5, "coarse_steps": 1, "coarse_fraction": 0.5}
    task = _run(sd_folder, tmp_path / "run", 3, **mixed)
    assert task.method.grid is task.method.after_curriculum and isinstance(task.method.grid, MixedGrid)
    skips = {int(k) for start, end in pairs for k in start - end}
    assert len(pairs) == 2 and skips <= {20, 19, 200, 199}  # steps 2 and 3, after the 1-step curriculum
    assert skips & {200, 199} and skips & {20, 19}  # both grids


def test_timestep_bias_draws_grid_points_in_proportion_to_i_to_the_gamma(sd_folder, tmp_path, monkeypatch):
    """--timestep-bias γ: the i-th grid point (ascending t) is drawn with probability ∝ i^γ; γ = 0 keeps the
    paper's uniform draw, random stream included; an LCD run draws its pairs on the biased grid."""
    from lcm.maths.timesteps import SkippingGrid

    n, draws = 10, 200_000
    uniform = SkippingGrid(n).sample(64, torch.Generator().manual_seed(3))[0]
    expected = SkippingGrid(n).timesteps[torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(uniform, expected)
    for gamma in (1.0, 2.0):
        start, end = SkippingGrid(n, 1000, gamma).sample(draws, torch.Generator().manual_seed(0))
        i = torch.arange(1, n + 1, dtype=torch.float64)
        p = i**gamma / (i**gamma).sum()
        freq = torch.bincount((start + 1) // 100 - 1, minlength=n).double() / draws
        assert torch.all((freq - p).abs() < 4 * (p * (1 - p) / draws).sqrt()), (gamma, freq, p)
        assert torch.equal(end, (start - 100).clamp(min=0))
    with pytest.raises(ValueError, match="bias"):
        SkippingGrid(n, 1000, -1.0)
    with pytest.raises(ValueError, match="timestep-bias"):
        LCDConfig(timestep_bias=float("nan"))

    pairs = _recorded_pairs(monkeypatch, SkippingGrid)
    task = _run(sd_folder, tmp_path / "run", 1, num_solver_steps=10, timestep_bias=200.0)
    assert task.method.grid.bias == 200.0
    assert pairs and all(torch.all(start == 999) for start, _ in pairs)  # every other point has probability < 0.9^200


def test_loss_monitor_bins_by_t_and_w():
    from lcm.training.lcd import LCDOutput, LossMonitor

    monitor = LossMonitor(1000, (1.0, 5.0))
    out = LCDOutput(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 260, 999, 999]), torch.tensor([1, 5, 2, 4.9]))
    monitor.add(out)
    logs = monitor.read()
    assert logs == {
        "loss_t0-249": 1.0,
        "loss_t250-499": 2.0,
        "loss_t750-999": 3.5,  # no sample fell in [500, 750): no entry rather than a made-up 0
        "loss_w_low": 2.0,
        "loss_w_high": 3.0,
    }
    assert monitor.read() == {}  # read starts over


@pytest.fixture(scope="module")
def image_folder(captioned_images):
    return captioned_images


class _Interrupted(Exception):
    pass


def _distill_cli(teacher, images, out, *extra) -> list[str]:
    args = ["distill", "--teacher", str(teacher), "--data", str(images), "--out", str(out), "--max-steps", "4"]
    return [*args, "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1", "--validate-every", "0", *extra]


def test_distill_cli_resume_latest_continues_from_the_checkpoint(sd_folder, image_folder, tmp_path, capsys):
    from lcm.training.task import DistillTask

    assert main(_distill_cli(sd_folder, image_folder, tmp_path / "straight")) == 0
    run, steps, original, die_at = tmp_path / "interrupted", [], DistillTask.after_optimizer_step, [3]

    def recorded(self, step):
        original(self, step)
        steps.append(step)
        if step in die_at:
            raise _Interrupted  # after the step's update, before its log line and any checkpoint of it

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DistillTask, "after_optimizer_step", recorded)
        with pytest.raises(_Interrupted):
            main(_distill_cli(sd_folder, image_folder, run))
        assert steps == [1, 2, 3] and [p.name for p in (run / "train" / "checkpoints").iterdir()] == ["step-2"]
        steps.clear()
        die_at.clear()
        capsys.readouterr()
        assert main(_distill_cli(sd_folder, image_folder, run, "--resume", "latest")) == 0
    assert "at step 2" in capsys.readouterr().out
    assert steps == [3, 4]  # only the steps after the checkpoint ran again

    straight = json.loads((tmp_path / "straight" / "train" / "train_history.json").read_text())
    resumed = json.loads((run / "train" / "train_history.json").read_text())
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"])
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_student_starts_student_and_target_from_a_distilled_folder(sd_folder, tmp_path):
    """--init-student: the student and its EMA target start as the folder's network, read back here with diffusers'
    own loader; a LoRA student, a folder of another shape and a missing folder are refused in one line."""
    from diffusers import UNet2DConditionModel

    from lcm.config import RunConfig, StudentConfig
    from lcm.training.task import DistillTask

    _run(sd_folder, tmp_path / "first", 2)  # exports a distilled model folder
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "first" / "unet").state_dict()
    teacher = LatentDiffusion.from_pretrained(sd_folder)
    task = DistillTask(teacher, LCDConfig(init_student=str(tmp_path / "first")), StudentConfig())
    assert any(
        not torch.equal(v, teacher.unet.state_dict()[k]) for k, v in reference.items() if k in teacher.unet.state_dict()
    )
    for network in (task.method.student, task.method.target):
        state = network.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)

    with pytest.raises(ValueError, match="^--init-student starts a full student from a model folder: drop --student"):
        RunConfig(student=StudentConfig(kind=StudentKind.LORA), method=LCDConfig(init_student="x"))
    with pytest.raises(ValueError, match="^--init-student .*: its network is not this student's shape"):
        DistillTask(teacher, LCDConfig(init_student=str(tmp_path / "first"), cfg_free=True), StudentConfig())
    with pytest.raises(ValueError, match="^--init-student .*absent: no model folder at"):
        DistillTask(teacher, LCDConfig(init_student=str(tmp_path / "absent")), StudentConfig())
