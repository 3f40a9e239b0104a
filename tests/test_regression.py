"""The regression term of lcm distill (--regression-weight, --regression-pairs) and lcm pairs: a pair is the
teacher's sample at the pair's own w from the pair's noise, the term is λ·mean((x − x̂0)²) with x the student's 1-step
sample as `lcm sample` draws it, and pairs another teacher made are refused."""

import copy

import pytest
import torch

from lcm.cli import main
from lcm.config import LCDConfig, StudentKind
from lcm.maths.sampling import randn_per_image
from lcm.maths.timesteps import Sampler
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.sample import sample_latents
from lcm.training.lcd import LCD
from lcm.training.regression import Pairs, load_pairs, make_pairs, save_pairs, teacher_probe

ABOUT = {"teacher": "tiny", "sampler": "dpm", "steps": 3, "w_min": 1.0, "w_max": 5.0, "seed": 3, "prompts": "list"}
PROMPTS = ["a", "b", "c", "d", "e"]


def test_a_pair_is_the_teachers_sample_at_its_own_w_from_its_own_noise(tiny_sd):
    """Pair i against `sample_latents` (the sampler the diffusers parity tests cover) of prompt i at the scalar w
    drawn, as documented, from the generator of seed 3·1,000,000 + i after the noise: to the bit one pair a batch;
    batches of 2 mix w's and agree to the float noise of batching (a scalar-w batch of 2 moves this tiny random
    teacher's latents, up to ~50 in size, by ~6e-5)."""
    teacher = LatentDiffusion.from_pretrained(tiny_sd)
    pairs = make_pairs(teacher, PROMPTS, ABOUT, batch_size=1)
    mixed = make_pairs(teacher, PROMPTS, ABOUT, batch_size=2)
    assert len(pairs) == 5 and pairs.w.unique().numel() == 5 and torch.equal(mixed.w, pairs.w)
    torch.testing.assert_close(mixed.x0, pairs.x0, rtol=0, atol=1e-5 * pairs.x0.abs().max().item())
    for i, prompt in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(3_000_000 + i)
        z = randn_per_image((1, *teacher.latent_shape), [g])
        w = 1.0 + 4.0 * torch.rand((), generator=g).item()
        cond, uncond = teacher.encode_prompts([prompt]), teacher.encode_prompts([""])
        ref = sample_latents(teacher, cond, uncond, Sampler.DPM_SOLVER_2M, 3, w, [3_000_000 + i])
        torch.testing.assert_close(pairs.z[i : i + 1], z, rtol=0, atol=0)
        assert pairs.w[i].item() == pytest.approx(w, rel=1e-6)
        torch.testing.assert_close(pairs.x0[i : i + 1], ref, rtol=0, atol=0)


def test_lcm_pairs_resumes_and_extends_to_the_file_made_at_once(tiny_sd, tmp_path, capsys):
    flags = ["--teacher", str(tiny_sd), "--steps", "2", "--batch-size", "2", "--prompts", "embedded"]
    assert main(["pairs", "--out", str(tmp_path / "once.safetensors"), "--count", "5", *flags]) == 0
    assert main(["pairs", "--out", str(tmp_path / "grown.safetensors"), "--count", "2", *flags]) == 0
    assert main(["pairs", "--out", str(tmp_path / "grown.safetensors"), "--count", "5", *flags]) == 0
    once, grown = load_pairs(tmp_path / "once.safetensors"), load_pairs(tmp_path / "grown.safetensors")
    assert once.prompts == grown.prompts and len(once) == 5
    for name in ("z", "x0", "w", "probe"):
        torch.testing.assert_close(getattr(grown, name), getattr(once, name), rtol=0, atol=0)
    capsys.readouterr()
    other_steps = [*flags[:3], "3", *flags[4:]]
    assert main(["pairs", "--out", str(tmp_path / "once.safetensors"), "--count", "5", *other_steps]) == 2
    assert "made with other steps" in capsys.readouterr().err


def _method(tiny_sd, **settings) -> LCD:
    model = LatentDiffusion.from_pretrained(tiny_sd)
    student = full_student(model.unet)
    with torch.no_grad():  # a w projection that is not zero, so that the pair's w matters
        student.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return LCD(model, student, StudentKind.FULL, LCDConfig(num_solver_steps=10, **settings), copy.deepcopy(student))


def _pair_file(tiny_sd, path, w=4.5, probe=None):
    model = LatentDiffusion.from_pretrained(tiny_sd)
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(8))
    x0 = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(9))
    probe = teacher_probe(model) if probe is None else probe
    save_pairs(path, Pairs(z, x0, torch.tensor([w]), ["b"], probe, ABOUT))
    return z, x0


def _batch(model):
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return z0, model.encode_prompts(["a", "b", "c", "d"]), model.encode_prompts([""] * 4)


def test_the_term_is_the_1_step_samples_squared_error_and_leaves_the_consistency_draws_alone(tiny_sd, tmp_path):
    z, x0 = _pair_file(tiny_sd, tmp_path / "p.safetensors")
    plain_method = _method(tiny_sd)
    plain = plain_method.loss(*_batch(plain_method.model), torch.Generator().manual_seed(7)).loss
    method = _method(tiny_sd, regression_weight=0.5, regression_pairs=str(tmp_path / "p.safetensors"))
    out = method.loss(*_batch(method.model), torch.Generator().manual_seed(7))
    assert torch.equal(out.consistency, plain)  # its draws come last

    def one_step(w: float) -> torch.Tensor:  # `lcm sample --steps 1`'s path: the consistency step at T − 1
        student = method.student_model
        with torch.no_grad():
            return student.consistency_fn(student.encode_prompts(["b"]), torch.tensor([w]))(z, 999.0)

    expected = 0.5 * (one_step(4.5) - x0).pow(2).mean()
    torch.testing.assert_close(out.loss - out.consistency, expected.expand(4), rtol=1e-4, atol=1e-6)
    wrong_w = 0.5 * (one_step(3.0) - x0).pow(2).mean()
    assert (wrong_w - expected).abs() > 1e-3 * expected  # the pair's own w is what the test pins down
    torch.testing.assert_close(method.regression.read()["reg"], float(expected / 0.5), rtol=1e-4, atol=1e-6)
    assert method.regression.read() == {}  # logged once, without λ
    out.loss.mean().backward()
    assert all(p.grad is None for p in method.model.unet.parameters())  # the teacher stays frozen
    assert all(p.grad is None for p in method.target.parameters())


def test_pairs_of_another_teacher_or_shape_and_half_given_flags_are_refused(tiny_sd, tmp_path):
    model = LatentDiffusion.from_pretrained(tiny_sd)
    _pair_file(tiny_sd, tmp_path / "other.safetensors", probe=teacher_probe(model) * 1.5)
    with pytest.raises(ValueError, match="made by another teacher"):
        _method(tiny_sd, regression_weight=1.0, regression_pairs=str(tmp_path / "other.safetensors"))
    probe = teacher_probe(model)
    small = torch.zeros(1, 4, 4, 4)
    save_pairs(tmp_path / "small.safetensors", Pairs(small, small.clone(), torch.ones(1), ["b"], probe, ABOUT))
    with pytest.raises(ValueError, match="latents"):
        _method(tiny_sd, regression_weight=1.0, regression_pairs=str(tmp_path / "small.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of pairs")
    with pytest.raises(ValueError, match="unreadable"):
        load_pairs(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="go together"):
        LCDConfig(regression_weight=1.0)
    with pytest.raises(ValueError, match="go together"):
        LCDConfig(regression_pairs=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="drop --cfg-free"):
        LCDConfig(regression_weight=1.0, regression_pairs="p.safetensors", cfg_free=True)


def test_the_task_logs_every_terms_means_and_checkpoints_only_the_trained_ones(tiny_sd, tmp_path):
    """The run's log line carries the regression term's ``reg`` beside the adversarial term's logs (the method's
    ``terms``), while the checkpoint holds only the terms with networks of their own (``trained_terms``)."""
    from lcm.training.task import DistillTask

    _pair_file(tiny_sd, tmp_path / "p.safetensors")
    cfg = LCDConfig(
        num_solver_steps=10,
        regression_weight=0.5,
        regression_pairs=str(tmp_path / "p.safetensors"),
        adversarial_weight=0.1,
    )
    task = DistillTask(LatentDiffusion.from_pretrained(tiny_sd), cfg)
    assert set(task.method.terms) == {"adversarial", "regression"} and set(task.method.trained_terms) == {"adversarial"}
    out = task.method.loss(*_batch(task.model), torch.Generator().manual_seed(7))
    task.monitor.add(out)
    out.loss.mean().backward()
    task.after_optimizer_step(1)  # the discriminator's update, which logs its own loss
    logs = task.log_metrics()
    assert logs["reg"] > 0 and any(name.startswith("loss_t") for name in logs)
    assert {"adv_g", "adv_d", "adv_d_real", "adv_d_fake"} <= set(logs)
    assert not any(k.startswith("regression.") for k in task.state_dict())
    assert any(k.startswith("adversarial.") for k in task.state_dict())
