"""One owner of "which timesteps does this sampler visit" (lcm.maths.timesteps.sampler_timesteps) and one spacing
rule for the teacher samplers: what ``lcm timesteps`` prints is what ``lcm sample`` visits, and a 1-step teacher
DDIM starts at t = T − 1 whichever command runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.maths.timesteps import Sampler, sampler_timesteps
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import generate
from lcm.shipped import default_model_path


def _printed(capsys) -> list[int]:
    return [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()[1:]]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_of_tcd_are_tcd_schedulers(steps, capsys):
    from diffusers import TCDScheduler

    scheduler = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    assert main(["timesteps", "--sampler", "tcd", "--steps", str(steps)]) == 0
    assert _printed(capsys) == scheduler.timesteps.tolist()


def test_a_one_step_teacher_ddim_starts_at_t_999_in_every_command(tmp_path, capsys):
    teacher = LatentDiffusion.from_pretrained(default_model_path())
    assert teacher.scheduler_config["timestep_spacing"] == "leading"  # the config alone would start at t = 1
    assert sampler_timesteps(Sampler.DDIM, 1, teacher.scheduler_config, teacher.schedule).tolist() == [999]
    config = tmp_path / "scheduler_config.json"
    config.write_text((default_model_path() / "scheduler" / "scheduler_config.json").read_text())
    assert main(["timesteps", "--sampler", "ddim", "--steps", "1", "--scheduler-config", str(config)]) == 0
    assert _printed(capsys) == [999]

    out = tmp_path / "one.png"
    args = ["sample", "--model", str(default_model_path()), "--sampler", "ddim", "--steps", "1", "--num-images", "1"]
    assert main([*args, "--prompt", "a sneaker", "--out", str(out)]) == 0
    trailing = generate(teacher, ["a sneaker"], Sampler.DDIM, 1, teacher.default_w, [0])
    leading = generate(teacher, ["a sneaker"], Sampler.DDIM, 1, teacher.default_w, [0], timestep_spacing="config")
    pixels = torch.from_numpy(np.asarray(Image.open(out), dtype=np.float32)) / 127.5 - 1
    assert (pixels - trailing[0, 0]).abs().max() < 1 / 127  # the PNG is the trailing sample
    assert (pixels - leading[0, 0]).abs().max() > 0.1  # not the config's leading one (t = 1: noise)
