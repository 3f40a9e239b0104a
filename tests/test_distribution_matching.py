"""The distribution-matching term of lcm distill (--dmd-weight): off is the method without it, the gradient it gives
the student's 1-step sample is DMD2's (written out here from the teacher's raw ε outputs and the schedule's betas),
and its fake score learns the student's samples."""

import copy
import json

import pytest
import torch

from lcm.config import Consistency, LCDConfig, StudentKind
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.training.distribution_matching import DistributionMatching
from lcm.training.lcd import LCD


def _method(tiny_sd, **settings) -> LCD:
    model = LatentDiffusion.from_pretrained(tiny_sd)
    student = full_student(model.unet)
    return LCD(model, student, StudentKind.FULL, LCDConfig(num_solver_steps=10, **settings), copy.deepcopy(student))


def _batch(model):
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return z0, model.encode_prompts(["a", "b", "c", "d"]), model.encode_prompts([""] * 4)


@pytest.mark.parametrize("consistency", [Consistency.LCM, Consistency.TCD])
def test_weight_zero_is_no_term_and_the_term_leaves_the_consistency_draws_alone(tiny_sd, consistency):
    method = _method(tiny_sd, consistency=consistency)
    plain = method.loss(*_batch(method.model), torch.Generator().manual_seed(7)).loss
    assert method.distribution_matching is None and not method.terms
    # λ so small that it cannot move a float32 loss of this size: what is left is the consistency loss, bit for bit
    method = _method(tiny_sd, consistency=consistency, dmd_weight=1e-30)
    assert torch.equal(method.loss(*_batch(method.model), torch.Generator().manual_seed(7)).loss, plain)
    method = _method(tiny_sd, consistency=consistency, dmd_weight=1.0)
    out = method.loss(*_batch(method.model), torch.Generator().manual_seed(7))
    assert torch.equal(out.consistency, plain) and not torch.allclose(out.loss, plain)
    out.loss.mean().backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in method.model.unet.parameters())  # the teacher stays frozen
    assert all(p.grad is None for p in method.distribution_matching.fake.parameters())  # its step is its own


def test_the_samples_gradient_is_dmd2s_normalised_score_difference(tiny_sd):
    """d(term)/dx = λ·(x̂0_fake − x̂0_real)/mean|x − x̂0_real| / numel, with x̂0 from ε by the schedule's ᾱ (computed
    here from the betas) and the real ε the guided one, ε_c + w·(ε_c − ε_u)."""
    method = _method(tiny_sd, dmd_weight=0.5)
    model, term = method.model, method.distribution_matching
    with torch.no_grad():  # a fake score that differs from the teacher everywhere
        for p in term.fake.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _, cond, uncond = _batch(model)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 3.5, 5.0])
    w_emb = method.w_emb(w, x.device)
    term.generator_loss(x, cond, uncond, w, w_emb, torch.Generator().manual_seed(11)).sum().backward()

    g = torch.Generator().manual_seed(11)  # the term's draws, in its order: level, then noise
    t = torch.randint(20, 981, (4,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    z_t = (abar.sqrt() * x.detach() + (1 - abar).sqrt() * noise).float()
    with torch.no_grad():
        eps_c, eps_u = model.unet_output(z_t, t, cond), model.unet_output(z_t, t, uncond)
        eps_real = eps_c + w.reshape(-1, 1, 1, 1) * (eps_c - eps_u)
        eps_fake = model.with_network(term.fake).unet_output(z_t, t, cond, w_emb)
    x0_real = (z_t - (1 - abar).sqrt() * eps_real) / abar.sqrt()
    x0_fake = (z_t - (1 - abar).sqrt() * eps_fake) / abar.sqrt()
    scale = (x.detach() - x0_real).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    expected = 0.5 * (x0_fake - x0_real) / scale / x[0].numel()
    assert expected.abs().max() > 0
    torch.testing.assert_close(x.grad, expected.float(), rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_the_fake_score_learns_the_students_samples_and_round_trips_its_state(tiny_sd):
    """Its ε-loss on one fixed distribution of samples falls; only the fake score moves; state_dict → load gives an
    instance whose next step is the same to the bit."""
    method = _method(tiny_sd, dmd_weight=1.0, dmd_lr=1e-3)
    model, term = method.model, method.distribution_matching
    _, cond, uncond = _batch(model)
    w = torch.full((4,), 3.0)
    w_emb = method.w_emb(w, torch.device("cpu"))
    student, teacher = copy.deepcopy(method.student.state_dict()), copy.deepcopy(model.unet.state_dict())
    g, losses = torch.Generator().manual_seed(0), []
    samples = 0.5 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.3
    for i in range(30):
        term.generator_loss(samples, cond, uncond, w, w_emb, g)
        if i == 20:
            copy_ = DistributionMatching(model, method.student, 1.0, 1e-3)
            copy_.load_state_dict(term.state_dict())
            copy_.pending = list(term.pending)
        term.step()
        if i == 20:
            copy_.step()
            for (k, a), b in zip(term.fake.state_dict().items(), copy_.fake.state_dict().values(), strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
        losses.append(term.read()["dmd_fake"])
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, student[k]), k
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, teacher[k]), k


def test_settings_the_term_cannot_serve_are_refused(tiny_sd):
    with pytest.raises(ValueError, match="--cfg-free"):
        LCDConfig(dmd_weight=1.0, cfg_free=True)
    model = LatentDiffusion.from_pretrained(tiny_sd)
    with pytest.raises(ValueError, match="full students"):
        LCD(model, model.unet, StudentKind.LORA, LCDConfig(num_solver_steps=10, dmd_weight=1.0))


def test_the_fake_scores_w_projection_learns_at_the_students_w_rate(tiny_sd):
    """AdamW's first step moves each weight by about lr: the fake score's zero-initialised w projection moves exactly
    --w-lr-scale times as far as at scale 1, every other weight exactly as far."""
    method = _method(tiny_sd, dmd_weight=1.0)
    model = method.model
    _, cond, uncond = _batch(model)
    w = torch.tensor([1.0, 2.0, 3.0, 5.0])
    samples = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    moved = []
    for scale in (1.0, 10.0):
        term = DistributionMatching(model, method.student, 1.0, 1e-3, scale)
        before = copy.deepcopy(term.fake.state_dict())
        term.generator_loss(samples, cond, uncond, w, method.w_emb(w, samples.device), torch.Generator().manual_seed(4))
        term.step()
        moved.append({k: v - before[k] for k, v in term.fake.state_dict().items()})
    name = "time_embedding.cond_proj.weight"
    assert moved[0][name].abs().max() > 0
    torch.testing.assert_close(moved[1][name], 10 * moved[0][name], rtol=1e-5, atol=0)
    for key in moved[0]:
        if key != name:
            torch.testing.assert_close(moved[1][key], moved[0][key], rtol=0, atol=0, msg=key)


def test_k_fake_updates_are_k_adamw_steps_at_fresh_levels_and_noise(tiny_sd):
    """--dmd-fake-updates 3: the student's term is the one update's, to the bit (the extra draws come after every
    other), and the fake score ends where three AdamW steps written out here, each at its own draws, take it."""
    one = _method(tiny_sd, dmd_weight=1.0, dmd_lr=1e-3)
    three = _method(tiny_sd, dmd_weight=1.0, dmd_lr=1e-3, dmd_fake_updates=3)
    model, term = one.model, three.distribution_matching
    _, cond, uncond = _batch(model)
    w = torch.tensor([1.0, 2.0, 3.0, 5.0])
    w_emb = one.w_emb(w, torch.device("cpu"))
    samples = 0.5 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fake = copy.deepcopy(term.fake)
    losses = [
        m.distribution_matching.generator_loss(samples, cond, uncond, w, w_emb, torch.Generator().manual_seed(7))
        for m in (one, three)
    ]
    assert torch.equal(losses[0], losses[1])
    term.step()

    g = torch.Generator().manual_seed(7)
    lo, hi = term.levels
    torch.randint(lo, hi + 1, (4,), generator=g), torch.randn(samples.shape, generator=g)  # the student's term's
    optimizer = torch.optim.AdamW(fake.parameters(), lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0)
    for _ in range(3):
        noise = torch.randn(samples.shape, generator=g)
        t = torch.randint(lo, hi + 1, (4,), generator=g)
        z_t = model.schedule.add_noise(samples, noise, t)
        eps = fake(z_t, t, encoder_hidden_states=cond.hidden_states, timestep_cond=w_emb).sample
        optimizer.zero_grad()
        (eps.float() - noise).square().mean().backward()
        optimizer.step()
    for (k, a), b in zip(fake.state_dict().items(), term.fake.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    assert all(state["step"] == 3 for state in term.optimizer.state.values())
    assert not term.pending
