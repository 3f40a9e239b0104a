"""What the LCM's multistep sampler makes of a perfect consistency function, and which step of the LCM departs from it.

    python scripts/sampler_ceiling.py --lcm lcm-demo/lcm [--samples 1000] [--steps 4] [--w 1,3,5] [--ode-steps 12]

A perfect LCM of a teacher returns, from any (z_t, t), the point the teacher's guided PF-ODE reaches at t = 0. This
script puts the teacher's ODE (solved with DDIM, ``--ode-steps`` steps from t = 999 and proportionally fewer from
lower t) in the place of the consistency function, step by step, with the LCM sampler's own timesteps and re-noising
(the same per-image noise in every row). For each guidance weight w, on ``lcm eval``'s prompts and initial noise:

- ``teacher ODE``: the ODE from t = 999 alone: the teacher's own sample, the goals' reference.
- ``ODE every step``: the LCM sampler with the ODE as its consistency function: a perfect LCM of this teacher,
  what an exact consistency function makes with this sampler.
- ``LCM``: the LCM's own sampler.
- ``ODE then LCM``: the LCM's sampler with its first prediction ``f(z_999)`` replaced by the ODE's.
- ``LCM then ODE``: the LCM's first prediction, re-noised to the sampler's second timestep, then the ODE to 0.
- ``ODE then ODE``: the row above with the ODE in both places (its control).

- ``TCD ODE every step``: TCD's sampler (``--gamma``, timesteps as ``lcm sample --sampler tcd`` on the model's
  grid) with the ODE in the place of the trajectory function: each step the teacher's ODE from t_i to
  s_i = ⌊(1 − γ)·t_{i+1}⌋, then the forward process back up to t_{i+1}: a perfect TCD model at that γ. (A perfect PCM,
  and TCD at γ = 0, never re-noise: their sampler returns the teacher's ODE sample, the ``teacher ODE`` row.)

If the teacher's ODE carried its own forward-noised samples back exactly, every row with the ODE in it would be the
teacher's distribution. FD-clf and prompt accuracy are the embedded benchmark's (the shipped classifier; not FID).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from consistency_probe import ode_solution  # this script's folder (scripts/) is on the path when it runs

from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.maths.sampling import randn_per_image, sample_lcm
from lcm.maths.solvers import ddim_step
from lcm.maths.timesteps import Sampler, lcm_timesteps, sampler_timesteps, tcd_intermediate_timesteps
from lcm.models.formats import w_input_dim
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.shipped import default_model_path

ROWS = ("teacher ODE", "ODE every step", "LCM", "ODE then LCM", "LCM then ODE", "ODE then ODE", "TCD ODE every step")


def ode_fn(teacher: LatentDiffusion, cond, uncond, w: float, steps_from_top: int):
    """``(z, t) → x0``: the guided teacher's DDIM solution from (z, t) to 0, steps of about (T − 1) / steps_from_top."""
    top = teacher.schedule.num_train_timesteps - 1

    def solve(z: torch.Tensor, t: float) -> torch.Tensor:
        steps = max(1, math.ceil(steps_from_top * float(t) / top))
        return ode_solution(teacher, z, round(t), w, cond, uncond, steps)

    return solve


def perfect_tcd(teacher, lcm, z, cond, uncond, w: float, steps: int, gamma: float, ode_steps: int, gens):
    """TCD's strategic stochastic sampler with the teacher's ODE from t_i to s_i as its trajectory function."""
    denoiser = teacher.guided_denoiser(cond, uncond, torch.full((z.shape[0],), w))
    schedule, top = teacher.schedule, teacher.schedule.num_train_timesteps - 1
    ts = sampler_timesteps(Sampler.TCD, steps, lcm.scheduler_config, schedule).tolist()
    ss = tcd_intermediate_timesteps(torch.tensor(ts), gamma).tolist()
    noises = [randn_per_image(z.shape, gens) for _ in range(len(ts) - 1)] if gamma > 0 else []
    for i, (t, s) in enumerate(zip(ts, ss, strict=True)):
        grid = torch.linspace(t, s, max(1, math.ceil(ode_steps * (t - s) / top)) + 1).round().long().tolist()
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            full_a = torch.full((z.shape[0],), float(a))
            z = (
                denoiser(z, full_a).x0
                if b == 0
                else ddim_step(denoiser, z, full_a, torch.full_like(full_a, b), schedule)
            )
        if noises and i + 1 < len(ts):
            ratio = (schedule.alpha_sigma_at(float(ts[i + 1]))[0] / schedule.alpha_sigma_at(float(s))[0]) ** 2
            z = math.sqrt(ratio) * z + math.sqrt(1.0 - ratio) * noises[i]
    return z


@torch.no_grad()
def sample_row(row: str, teacher, lcm, prompts, seeds, w: float, steps: int, ode_steps: int, gamma: float = 0.3):
    """Latents → images ``[B, C, H, W]`` of one row for ``prompts`` and per-image ``seeds`` (lcm eval's noise)."""
    cond, uncond = teacher.encode_prompts(prompts, cache=True), teacher.encode_prompts([""] * len(prompts), cache=True)
    ws = torch.full((len(prompts),), w)
    f_lcm = lcm.consistency_fn(cond, ws if w_input_dim(lcm.unet) is not None else None)
    f_ode = ode_fn(teacher, cond, uncond, w, ode_steps)
    original = int(lcm.scheduler_config.get("original_inference_steps", 50))
    ts = lcm_timesteps(steps, original, lcm.schedule.num_train_timesteps)
    first = float(ts[0])
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = randn_per_image((len(prompts), *teacher.latent_shape), gens)
    schedule = lcm.schedule
    if row == "teacher ODE":
        x0 = f_ode(z, first)
    elif row == "TCD ODE every step":
        x0 = perfect_tcd(teacher, lcm, z, cond, uncond, w, steps, gamma, ode_steps, gens)
    elif row == "ODE every step":
        x0 = sample_lcm(f_ode, z, ts, schedule, gens)
    elif row == "LCM":
        x0 = sample_lcm(f_lcm, z, ts, schedule, gens)
    elif row == "ODE then LCM":
        x0 = sample_lcm(lambda z, t: f_ode(z, t) if t == first else f_lcm(z, t), z, ts, schedule, gens)
    elif row == "LCM then ODE":  # two "steps", the second solved to 0
        x0 = sample_lcm(lambda z, t: f_lcm(z, t) if t == first else f_ode(z, t), z, ts[:2], schedule, gens)
    else:  # "ODE then ODE"
        x0 = sample_lcm(f_ode, z, ts[:2], schedule, gens)
    return teacher.decode(x0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lcm", type=Path, required=True, help="the LCM's diffusers folder")
    p.add_argument("--samples", type=int, default=1000, help="images per row")
    p.add_argument("--steps", default="4", help="comma-separated step counts of the LCM sampler")
    p.add_argument("--w", default="1,3,5", help="comma-separated guidance weights")
    p.add_argument("--ode-steps", type=int, default=12, help="DDIM steps of the teacher's ODE from t = 999")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="the prompts and noise (lcm eval's --seed)")
    p.add_argument("--gamma", type=float, default=0.3, help="γ of the TCD row (TCD's default 0.3)")
    p.add_argument("--out", type=Path, help="the scores as JSON (rows already there are kept, not rerun)")
    a = p.parse_args()
    rows = a.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    torch.set_grad_enabled(False)
    teacher_dir = default_model_path()
    teacher, lcm = LatentDiffusion.from_pretrained(teacher_dir), LatentDiffusion.from_pretrained(a.lcm)
    evaluator = FashionEvaluator(teacher_dir / "classifier")
    evals = fashion_eval_prompts(a.samples, a.seed)
    result: dict[str, dict] = json.loads(a.out.read_text()) if a.out and a.out.is_file() else {}
    for steps in (int(s) for s in a.steps.split(",")):
        for w in (float(x) for x in a.w.split(",")):
            for row in rows:
                key = f"{row}|{'-' if row == 'teacher ODE' else steps}|{w:g}"  # the teacher's row has no steps
                key += f"|γ {a.gamma:g}" if row.startswith("TCD") else ""
                if key in result or (steps == 2 and row == "ODE then ODE"):  # at 2 steps: "ODE every step"
                    continue
                images = torch.cat(
                    [
                        sample_row(
                            row,
                            teacher,
                            lcm,
                            evals.prompts[i : i + a.batch],
                            evals.seeds[i : i + a.batch],
                            w,
                            steps,
                            a.ode_steps,
                            a.gamma,
                        )
                        for i in range(0, a.samples, a.batch)
                    ]
                )
                m = evaluator.evaluate(images, evals.labels)
                result[key] = {"fd_clf": m["fd_clf"], "accuracy": m["prompt_accuracy"]}
                print(
                    f"{steps} steps, w = {w:g}: {row:15s} FD-clf {m['fd_clf']:6.1f}, accuracy "
                    f"{m['prompt_accuracy']:.3f}",
                    flush=True,
                )
                if a.out:
                    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
