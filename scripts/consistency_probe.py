"""Where an LCM's few-step error comes from: its consistency error against the teacher's ODE, per t and per w.

    python scripts/consistency_probe.py --lcm lcm-demo/lcm [--samples 256] [--ode-steps 50] [--out probe.json]

For latents on the teacher's trajectories, at several grid timesteps t and guidance weights w:

- ``ode``: the teacher's guided PF-ODE solved from (z_t, t) to 0 with ``--ode-steps`` DDIM steps: the point the
  consistency function should return.
- ``err(t, w)``: RMS of ``f_θ(z_t, w, t) − ode(z_t, w)`` in latent space. At t = 999 it is the 1-step error.
- ``w-gain(t)``: how much of the teacher's response to w the student reproduces, ``⟨Δf, Δode⟩ / ‖Δode‖²`` with
  Δ = value at w_hi − value at w_lo. 1 means the student moves with w exactly as the teacher's ODE does; 0 means it
  ignores w.

z_t is drawn as the forward process of a clean teacher sample (a 50-step teacher DDIM image at the same w), so every
point lies where sampling visits. Also printed: the norm of the student's w projection (zero at initialisation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lcm.data.captions import class_prompts
from lcm.maths.guidance import w_embedding
from lcm.maths.sampling import randn_per_image
from lcm.maths.solvers import ddim_step
from lcm.models.formats import w_input_dim
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.shipped import default_model_path


@torch.no_grad()
def ode_solution(teacher: LatentDiffusion, z: torch.Tensor, t: int, w: float, cond, uncond, steps: int):
    """The guided teacher's DDIM solution from (z, t) to t = 0 (``steps`` evenly spaced steps, trailing)."""
    denoiser = teacher.guided_denoiser(cond, uncond, torch.full((z.shape[0],), w))
    grid = torch.linspace(t, 0, steps + 1).round().long().tolist()
    for s, e in zip(grid[:-1], grid[1:], strict=True):
        b = z.shape[0]
        if e == 0:
            return denoiser(z, torch.full((b,), float(s))).x0
        z = ddim_step(denoiser, z, torch.full((b,), float(s)), torch.full((b,), float(e)), teacher.schedule)
    return z


@torch.no_grad()
def probe(lcm_dir: Path, samples: int, ode_steps: int, ts: list[int], ws: list[float], seed: int) -> dict:
    teacher = LatentDiffusion.from_pretrained(default_model_path())
    lcm = LatentDiffusion.from_pretrained(lcm_dir)
    prompts = [class_prompts()[i % 10] for i in range(samples)]
    cond, uncond = teacher.encode_prompts(prompts), teacher.encode_prompts([""] * samples)
    w_dim = w_input_dim(lcm.unet)
    gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(samples)]
    shape = (samples, *teacher.latent_shape)
    noise0 = randn_per_image(shape, gens)
    noise1 = randn_per_image(shape, gens)
    result = {"lcm": str(lcm_dir), "samples": samples, "ode_steps": ode_steps, "err": {}, "w_gain": {}}
    if w_dim is not None:
        result["w_projection_norm"] = lcm.unet.time_embedding.cond_proj.weight.norm().item()
    for w in ws:
        # clean teacher samples at this w: the data the forward process starts from
        x0 = ode_solution(teacher, noise0, 999, w, cond, uncond, ode_steps)
        for t in ts:
            tt = torch.full((samples,), t)
            z = teacher.schedule.add_noise(x0, noise1, tt)
            target = ode_solution(teacher, z, t, w, cond, uncond, ode_steps)
            emb = w_embedding(torch.full((samples,), w), w_dim) if w_dim is not None else None
            f = lcm.consistency_output(z, tt.float(), cond, emb)
            result["err"][f"{t},{w}"] = (f - target).pow(2).mean().sqrt().item()
            result.setdefault("_f", {})[f"{t},{w}"] = f
            result.setdefault("_ode", {})[f"{t},{w}"] = target
    lo, hi = min(ws), max(ws)
    for t in ts:
        df = result["_f"][f"{t},{hi}"] - result["_f"][f"{t},{lo}"]
        do = result["_ode"][f"{t},{hi}"] - result["_ode"][f"{t},{lo}"]
        result["w_gain"][str(t)] = ((df * do).sum() / do.pow(2).sum()).item()
    del result["_f"], result["_ode"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lcm", type=Path, required=True)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--ode-steps", type=int, default=50)
    p.add_argument("--t", default="999,759,499,259,99", help="comma-separated timesteps")
    p.add_argument("--w", default="1,3,5", help="comma-separated guidance weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    ts, ws = [int(x) for x in a.t.split(",")], [float(x) for x in a.w.split(",")]
    r = probe(a.lcm, a.samples, a.ode_steps, ts, ws, a.seed)
    print(f"{a.lcm}: w projection norm {r.get('w_projection_norm', float('nan')):.3f}")
    print("t    " + "".join(f"  err w={w:g}" for w in ws) + "   w-gain")
    for t in ts:
        errs = "".join(f"  {r['err'][f'{t},{w}']:9.4f}" for w in ws)
        print(f"{t:4d} {errs}   {r['w_gain'][str(t)]:.3f}")
    if a.out:
        a.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
