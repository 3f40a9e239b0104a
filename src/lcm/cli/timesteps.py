"""``lcm timesteps``: the timesteps a sampler visits, with alpha_t and sigma_t."""

from __future__ import annotations

import argparse
import json

from lcm.cli.common import STABLE_DIFFUSION_SCHEDULE, check_int
from lcm.maths.timesteps import DEFAULT_NUM_SOLVER_STEPS, SPACINGS, Sampler


def run_timesteps(args: argparse.Namespace) -> int:
    from lcm.maths.schedule import schedule_from_config
    from lcm.maths.timesteps import sampler_timesteps

    check_int(args.original_steps, "--original-steps", 1, 1000)
    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {args.strength}")
    config = STABLE_DIFFUSION_SCHEDULE
    if args.scheduler_config:
        try:
            config = json.loads(args.scheduler_config.read())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"--scheduler-config: not a JSON file ({type(err).__name__})") from None
        if not isinstance(config, dict):
            raise ValueError(
                f"--scheduler-config must hold a JSON object (a scheduler config), got {type(config).__name__}"
            )
    config = {**config, "original_inference_steps": args.original_steps}
    schedule = schedule_from_config(config)  # a FlowMatch* config: a flow's schedule, real-valued t = 1000·σ
    sampler = Sampler(args.sampler)
    ts = sampler_timesteps(sampler, args.steps, config, schedule, args.strength, args.spacing)
    alpha, sigma = schedule.alpha_sigma(ts)
    print(f"{'t':>{8 if schedule.is_flow else 4}}  {'alpha_t':>8}  {'sigma_t':>8}")
    for t, a, s in zip(ts.tolist(), alpha.tolist(), sigma.tolist(), strict=True):
        print(f"{t:>4d}  {a:8.6f}  {s:8.6f}" if isinstance(t, int) else f"{t:>8.3f}  {a:8.6f}  {s:8.6f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "timesteps",
        help="print a sampler's timesteps with their alpha_t and sigma_t",
        description="Print the timesteps a sampler visits, exactly as lcm sample, lcm eval and lcm serve visit them "
        "(and as the installed diffusers scheduler would).",
    )
    p.add_argument("--sampler", choices=[s.value for s in Sampler], default="lcm", help="sampler (default lcm)")
    p.add_argument("--steps", type=int, default=4, help="number of sampling steps (default 4)")
    p.add_argument(
        "--original-steps",
        type=int,
        default=DEFAULT_NUM_SOLVER_STEPS,
        help=f"lcm and tcd: N, the skipping grid the LCM was distilled on (default {DEFAULT_NUM_SOLVER_STEPS})",
    )
    p.add_argument("--strength", type=float, default=1.0, help="img2img strength in (0, 1] (default 1: from noise)")
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        help="ddim, dpm, dpmpp: timestep spacing (default trailing, every command's; config: the scheduler config's)",
    )
    p.add_argument(
        "--scheduler-config",
        type=argparse.FileType("r"),
        help="a diffusers scheduler_config.json (default: Stable Diffusion's scaled-linear schedule; a FlowMatch* "
        "config gives a flow-matching model's timesteps, t = 1000·sigma)",
    )
    p.set_defaults(func=run_timesteps)
