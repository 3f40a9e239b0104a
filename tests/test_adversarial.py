"""The adversarial term of lcm distill (--adversarial-weight): off is the method without it, its re-noising has the
forward process's marginal, its features are the teacher encoder's own, and its discriminator learns."""

import copy
import json

import pytest
import torch

from lcm.config import AdversarialInput, Consistency, LCDConfig, StudentKind
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.training.adversarial import AdversarialTerm, encoder_features, renoise
from lcm.training.lcd import LCD


def _losses(tiny_sd, **settings):
    """Per-sample LCD losses of one batch (same student, target, batch and draws) and the method."""
    model = LatentDiffusion.from_pretrained(tiny_sd)
    student = full_student(model.unet)
    target = copy.deepcopy(student)
    method = LCD(model, student, StudentKind.FULL, LCDConfig(num_solver_steps=10, **settings), target)
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = model.encode_prompts(["a", "b", "c", "d"]), model.encode_prompts([""] * 4)
    return method.loss(z0, cond, uncond, torch.Generator().manual_seed(7)), method


@pytest.mark.parametrize("consistency", [Consistency.LCM, Consistency.TCD])
def test_weight_zero_is_no_discriminator_and_the_term_leaves_the_consistency_draws_alone(tiny_sd, consistency):
    out, method = _losses(tiny_sd, consistency=consistency)
    plain = out.loss
    assert method.adversarial is None and out.consistency is None
    # λ so small that λ·D cannot move a float32 loss of this size: what is left is the consistency loss, which
    # must be the plain one bit for bit (the term draws its levels and noise after every draw of the method)
    tiny, method = _losses(tiny_sd, consistency=consistency, adversarial_weight=1e-30)
    assert method.adversarial is not None and torch.equal(tiny.loss, plain)
    out, method = _losses(tiny_sd, consistency=consistency, adversarial_weight=1.0)
    strong = out.loss
    assert not torch.allclose(strong, plain)
    assert torch.equal(out.consistency, plain)  # what the per-t / per-w log bins see: the distance alone
    strong.mean().backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in method.model.unet.parameters())  # the teacher stays frozen
    assert all(p.grad is None for p in method.adversarial.heads.parameters())  # its step is its own


@pytest.mark.parametrize("consistency", [Consistency.LCM, Consistency.TCD, Consistency.PCM])
def test_one_step_input_judges_the_students_one_step_sample(tiny_sd, monkeypatch, consistency):
    """--adversarial-input one-step: the discriminator sees the student's 1-step sample from pure noise (at the
    clean end, s = None), and that sample is what lcm sample's 1-step sampler draws from the same noise."""
    from lcm.maths.timesteps import Sampler, sampler_timesteps
    from lcm.sample import _run
    from lcm.shipped import default_model_path

    seen = {}
    original_one_step, original_generator_loss = LCD.one_step, AdversarialTerm.generator_loss

    def one_step(self, z, cond, w_emb):
        seen["z"], seen["out"] = z, original_one_step(self, z, cond, w_emb)
        return seen["out"]

    def generator_loss(self, model, prediction, s, *args):
        seen["fake"], seen["s"] = prediction, s
        return original_generator_loss(self, model, prediction, s, *args)

    monkeypatch.setattr(LCD, "one_step", one_step)
    monkeypatch.setattr(AdversarialTerm, "generator_loss", generator_loss)
    phases = {"phases": 2} if consistency is Consistency.PCM else {}
    settings = {"consistency": consistency, "adversarial_weight": 0.1, **phases}
    out, method = _losses(tiny_sd, adversarial_input=AdversarialInput.ONE_STEP, **settings)
    assert seen["fake"] is seen["out"] and seen["s"] is None
    assert not torch.equal(out.loss, _losses(tiny_sd, **settings)[0].loss)  # another input, another term

    # the reference: the sampling code's 1-step sampler (LCM's, or TCD's at any γ) on the student as a model
    ts = sampler_timesteps(Sampler.LCM, 1, LatentDiffusion.from_pretrained(default_model_path()).scheduler_config,
                           method.model.schedule)  # fmt: skip
    assert ts.tolist() == [method.model.schedule.num_train_timesteps - 1]  # a 1-step sample starts at T − 1
    sampler = Sampler.LCM if consistency is Consistency.LCM else Sampler.TCD
    cond, uncond = method.model.encode_prompts(["a", "b", "c", "d"]), method.model.encode_prompts([""] * 4)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    with torch.no_grad():  # at one w for the whole batch (the loss drew one per sample)
        w = 3.0
        mine = original_one_step(method, seen["z"], cond, method.w_emb(torch.full((4,), w), seen["z"].device))
        reference = _run(method.student_model, sampler, seen["z"], ts, cond, uncond, w, gens, 0.3, 0.0)
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_renoising_has_the_forward_processes_marginal(tiny_sd):
    """z_s ~ q(z_s | x), then renoise(s → t): mean α_t·x and std σ_t, as q(z_t | x) directly (Monte Carlo); from
    s = 0 it is α_t·x + σ_t·ε exactly."""
    model = LatentDiffusion.from_pretrained(tiny_sd)
    g = torch.Generator().manual_seed(0)
    n, x = 200_000, 0.7
    s, t = torch.full((n,), 300.0), torch.full((n,), 650.0)
    alpha_s, sigma_s = model.schedule.alpha_sigma_at(300.0)
    alpha_t, sigma_t = model.schedule.alpha_sigma_at(650.0)
    z_s = (alpha_s * x + sigma_s * torch.randn(n, 1, generator=g)).double()
    z_t = renoise(model, z_s, s, t, torch.randn(n, 1, generator=g).double())
    assert z_t.mean().item() == pytest.approx(alpha_t * x, abs=4 * sigma_t / n**0.5)
    assert z_t.std().item() == pytest.approx(sigma_t, rel=0.01)
    eps = torch.randn(3, 1, generator=g).double()
    direct = renoise(model, torch.full((3, 1), x).double(), torch.zeros(3), torch.full((3,), 650.0), eps)
    torch.testing.assert_close(direct, alpha_t * x + sigma_t * eps, rtol=1e-6, atol=0)  # float32 tables


def test_encoder_features_are_the_unets_down_path_and_the_up_path_is_not_run(tiny_sd):
    model = LatentDiffusion.from_pretrained(tiny_sd)
    unet = model.unet
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, text = torch.tensor([200.0, 700.0]), model.encode_prompts(["a", "b"])
    reference, calls = [], []
    keep = [b.register_forward_hook(lambda m, i, o: reference.append(o[0] if isinstance(o, tuple) else o))
            for b in [*unet.down_blocks, unet.mid_block]]  # fmt: skip
    with torch.no_grad():
        model.unet_output(z, t, text)  # a whole forward
    for h in keep:
        h.remove()
    count = [b.register_forward_hook(lambda m, i, o: calls.append(m)) for b in unet.up_blocks]
    with torch.no_grad():
        features = encoder_features(model, z, t, text)
    for h in count:
        h.remove()
    assert len(features) == len(unet.down_blocks) + 1 and not calls
    for ours, ref in zip(features, reference, strict=True):
        assert torch.equal(ours, ref)


def test_the_discriminator_learns_to_tell_data_from_the_student(tiny_sd, captioned_images, tmp_path):
    """A short run at λ > 0: the heads move, its hinge loss falls below its value at chance (2), the real logits end
    above the fake ones, and the log names every part of the term."""
    from lcm.cli import main

    out = tmp_path / "adv"
    args = ["distill", "--teacher", str(tiny_sd), "--data", str(captioned_images), "--out", str(out)]
    args += ["--max-steps", "12", "--batch-size", "4", "--adversarial-weight", "0.1", "--adversarial-lr", "1e-3"]
    args += ["--log-every", "6", "--validate-every", "0", "--num-solver-steps", "10", "--resolution", "64"]
    assert main(args) == 0
    history = json.loads((out / "train" / "train_history.json").read_text())
    last = history[-1]
    assert {"adv_g", "adv_d", "adv_d_real", "adv_d_fake"} <= last.keys()
    assert last["adv_d"] < 2.0 and last["adv_d_real"] > last["adv_d_fake"]
    record = json.loads((out / "train" / "run_config.json").read_text())
    assert record["method"]["adversarial_weight"] == 0.1
