"""Text → images with any model folder: the LCM sampler for LCMs, DDIM / DPM-Solver / DPM-Solver++ for teachers."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import torch

from lcm.maths.sampling import randn_per_image, sample_ddim, sample_dpm_solver, sample_lcm
from lcm.maths.timesteps import ddim_timesteps, dpm_solver_timesteps, lcm_timesteps
from lcm.models.formats import w_input_dim
from lcm.models.latent_diffusion import LatentDiffusion

__all__ = ["Sampler", "default_model_path", "generate", "sample_latents"]

ASSETS = Path(__file__).parent / "assets"


class Sampler(str, Enum):
    """How images are drawn; values are the CLI's spellings. The DPM samplers are *multistep* (2M), unlike the
    singlestep LCD solvers of the same names (:class:`lcm.maths.solvers.Solver`)."""

    LCM = "lcm"  # multistep consistency sampling (LCMs only)
    DDIM = "ddim"
    DPM_SOLVER_2M = "dpm"  # DPM-Solver, 2nd-order multistep
    DPM_SOLVER_PP_2M = "dpmpp"  # DPM-Solver++(2M)


def default_model_path() -> Path:
    """The shipped embedded Fashion-MNIST teacher."""
    path = ASSETS / "fashion-teacher"
    if not (path / "unet").is_dir():
        raise ValueError(f"the shipped teacher is missing from {path}; reinstall the package or give --model")
    return path


def sample_latents(
    model: LatentDiffusion,
    cond,
    uncond,
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    timestep_spacing: str | None = None,
) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` for per-image ``seeds``; ``cond``/``uncond`` are TextEmbeddings of B prompts.

    ``timestep_spacing`` overrides the scheduler config's for the teacher samplers (e.g. ``"trailing"``, which starts
    every schedule at t = T − 1; with ``"leading"`` a 1-step DDIM starts at t = 1 and returns noise).
    """
    batch = len(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = randn_per_image((batch, *model.latent_shape), gens).to(model.device)
    ws = torch.full((batch,), float(w))
    config, schedule = model.scheduler_config, model.schedule
    if sampler is Sampler.LCM:
        if not model.is_lcm:
            raise ValueError("the lcm sampler needs an LCM (a distilled model); use --sampler ddim|dpm|dpmpp")
        original = int(config.get("original_inference_steps", 50))
        ts = lcm_timesteps(steps, original, schedule.num_train_timesteps)
        f = model.consistency_fn(cond, ws if w_input_dim(model.unet) is not None else None)
        return sample_lcm(f, z, ts, schedule, gens)
    denoiser = model.guided_denoiser(cond, uncond, ws) if w != 0 else model.denoiser(cond)
    spacing = timestep_spacing or config.get("timestep_spacing", "leading")
    offset = int(config.get("steps_offset", 0))
    if sampler is Sampler.DDIM:
        return sample_ddim(denoiser, z, ddim_timesteps(steps, schedule.num_train_timesteps, spacing, offset), schedule)
    ts = dpm_solver_timesteps(steps, schedule, spacing, offset)
    return sample_dpm_solver(denoiser, z, ts, schedule, data_prediction=sampler is Sampler.DPM_SOLVER_PP_2M)


def generate(
    model: LatentDiffusion,
    prompts: Sequence[str],
    sampler: Sampler,
    steps: int,
    w: float,
    seeds: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
    timestep_spacing: str | None = None,
) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [−1, 1], image i from ``prompts[i]`` and ``seeds[i]`` (independent of batching)."""
    if len(prompts) != len(seeds):
        raise ValueError("give one seed per prompt")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    from tqdm import tqdm

    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=f"{sampler.value} {steps} steps", disable=not progress, unit="batch"):
        p = list(prompts[i : i + batch_size])
        cond = model.encode_prompts(p)
        uncond = model.encode_prompts([""] * len(p))
        latents = sample_latents(model, cond, uncond, sampler, steps, w, seeds[i : i + batch_size], timestep_spacing)
        out.append(model.decode(latents).cpu())
    return torch.cat(out)
