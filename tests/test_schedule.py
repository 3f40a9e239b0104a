import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lcm.maths.schedule import NoiseSchedule

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


@pytest.mark.parametrize(
    "config",
    [
        SD_CONFIG,
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {**SD_CONFIG, "rescale_betas_zero_snr": True},
    ],
    ids=["scaled_linear", "linear", "cosine", "zero_snr"],
)
def test_alphas_cumprod_match_diffusers(config, parity):
    ours = NoiseSchedule.from_config(config).alphas_cumprod
    ref = DDPMScheduler(**config).alphas_cumprod  # diffusers builds in float32
    parity(ours, ref, tol=1e-5, label=config.get("beta_schedule", ""))


def test_integer_lookup_is_exact_and_alpha_sigma_consistent():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, schedule.alphas_cumprod[t], rtol=1e-14, atol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(6, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(schedule.lambda_(t), alpha.log() - sigma.log(), rtol=1e-12, atol=1e-12)


def test_log_alpha_is_piecewise_linear_between_integers():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    la = schedule.log_alpha(torch.tensor([10.0, 11.0, 10.25], dtype=torch.float64))
    assert la[2].item() == pytest.approx(0.75 * la[0].item() + 0.25 * la[1].item(), rel=1e-13)


def test_t_of_lambda_inverts_lambda():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    t = torch.tensor([0.0, 3.5, 19.0, 250.75, 998.2, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_of_lambda(schedule.lambda_(t)), t, rtol=0, atol=1e-8)


def test_out_of_range_timestep_is_a_clear_error():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.alpha(torch.tensor([1000]))


def test_final_alpha_cumprod_follows_set_alpha_to_one():
    assert NoiseSchedule.from_config({**SD_CONFIG, "set_alpha_to_one": True}).final_alpha_cumprod == 1.0
    sched = NoiseSchedule.from_config({**SD_CONFIG, "set_alpha_to_one": False})
    assert sched.final_alpha_cumprod == pytest.approx(float(DDIMScheduler(**SD_CONFIG).alphas_cumprod[0]), rel=1e-6)


def test_from_pretrained_reads_scheduler_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    DDIMScheduler(**SD_CONFIG).save_config(tmp_path / "scheduler")
    sched = NoiseSchedule.from_pretrained(tmp_path)
    torch.testing.assert_close(sched.alphas_cumprod, NoiseSchedule.from_config(SD_CONFIG).alphas_cumprod)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "scaled_linear"


def test_from_pretrained_missing_config_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="scheduler_config.json"):
        NoiseSchedule.from_pretrained(tmp_path)


def test_unknown_beta_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
