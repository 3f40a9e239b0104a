import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from lcm.maths.consistency import boundary_scalings, consistency_function
from lcm.maths.guidance import cfg_combine, guidance_scale_from_w, w_embedding, w_from_guidance_scale
from lcm.maths.losses import LossType, consistency_loss, l2_loss, pseudo_huber_loss
from lcm.maths.parameterization import PredictionType, to_denoised, to_model_output
from lcm.maths.schedule import NoiseSchedule


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = torch.tensor([0, 250, 999])
    alpha, sigma = schedule.alpha_sigma(t)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    z = alpha.float()[:, None, None, None] * x0 + sigma.float()[:, None, None, None] * eps
    return x0, eps, z, alpha, sigma


@pytest.mark.parametrize("ptype", [p for p in PredictionType if p is not PredictionType.FLOW])  # VP: α² + σ² = 1
def test_exact_model_output_recovers_x0_and_eps(sample, ptype):
    x0, eps, z, alpha, sigma = sample
    if ptype is PredictionType.SAMPLE:  # ε from x0 divides by σ: skip t where σ is tiny
        x0, eps, z, alpha, sigma = x0[1:], eps[1:], z[1:], alpha[1:], sigma[1:]
    out = to_model_output(x0, eps, alpha, sigma, ptype)
    d = to_denoised(out, z, alpha, sigma, ptype)
    torch.testing.assert_close(d.x0, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(d.eps, eps, rtol=1e-4, atol=2e-4)


def test_v_target_definition(sample):
    x0, eps, _, alpha, sigma = sample
    v = to_model_output(x0, eps, alpha, sigma, PredictionType.V_PREDICTION)
    torch.testing.assert_close(v, alpha.float()[:, None, None, None] * eps - sigma.float()[:, None, None, None] * x0)


def test_unknown_prediction_type_message():
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        PredictionType.parse("flow")


def test_cfg_combine_equals_diffusers_convention():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    w = torch.tensor([0.0, 1.0, 3.5, 7.0])
    ours = cfg_combine(cond, uncond, w)
    # diffusers' StableDiffusionPipeline: uncond + g·(cond − uncond) with g = w + 1
    gs = torch.tensor([guidance_scale_from_w(float(x)) for x in w])[:, None, None, None]
    torch.testing.assert_close(ours, uncond + gs * (cond - uncond))
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), cond)  # w = 0: no guidance
    assert w_from_guidance_scale(guidance_scale_from_w(6.0)) == 6.0


@pytest.mark.parametrize("dim", [256, 255, 32])
def test_w_embedding_matches_lcm_pipeline(dim, parity):
    ws = [0.0, 1.0, 3.5, 7.0, 14.0]
    pipeline_guidance = torch.tensor([guidance_scale_from_w(w) for w in ws])
    # the pipeline embeds guidance_scale − 1; call its method unbound (it uses no pipeline state)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, pipeline_guidance - 1, embedding_dim=dim)
    ours = w_embedding(torch.tensor(ws), dim=dim)
    assert ours.shape == (5, dim)
    parity(ours, ref, tol=0.0, label=str(dim))  # same ops, same order: bit-identical


def test_boundary_scalings_closed_forms_and_lcm_scheduler():
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out = boundary_scalings(torch.tensor([999]))
    assert c_skip.item() < 1e-6 and c_out.item() == pytest.approx(1.0, abs=1e-6)
    sched = LCMScheduler()
    t = torch.arange(0, 1000, 37)
    c_skip, c_out = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-12)


def test_consistency_function_is_identity_at_t0():
    g = torch.Generator().manual_seed(2)
    z, x0 = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    out = consistency_function(z, x0, *boundary_scalings(torch.tensor([0, 500])))
    torch.testing.assert_close(out[0], z[0])
    c_skip, c_out = boundary_scalings(torch.tensor([500]))
    torch.testing.assert_close(out[1], c_skip.float() * z[1] + c_out.float() * x0[1])


def test_pseudo_huber_limits():
    c = 0.001
    a = torch.zeros(3, 1, 1, 1)
    big = torch.full((3, 1, 1, 1), 10.0)
    small = torch.full((3, 1, 1, 1), 1e-6)
    torch.testing.assert_close(pseudo_huber_loss(a, a, c), torch.zeros(3))
    torch.testing.assert_close(pseudo_huber_loss(big, a, c), torch.full((3,), 10.0 - c), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pseudo_huber_loss(small, a, c), torch.full((3,), 1e-12 / (2 * c)), rtol=1e-3, atol=0)
    with pytest.raises(ValueError):
        pseudo_huber_loss(a, a, 0.0)


def test_losses_are_per_sample():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    l2 = l2_loss(a, b)
    assert l2.shape == (5,)
    torch.testing.assert_close(l2[2], ((a[2] - b[2]) ** 2).mean())
    torch.testing.assert_close(consistency_loss(a, b, LossType.HUBER), pseudo_huber_loss(a, b))


def test_pseudo_huber_equals_its_definition_in_float64():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    c = 0.05
    d = a.double() - b.double()
    naive = (torch.sqrt(d**2 + c**2) - c).flatten(1).mean(1)
    torch.testing.assert_close(pseudo_huber_loss(a, b, c).double(), naive, rtol=1e-6, atol=1e-7)
