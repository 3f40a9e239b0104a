"""``lcm timesteps``: the timesteps a sampler visits, with alpha_t and sigma_t."""

from __future__ import annotations

import argparse
import json

from lcm.cli.common import STABLE_DIFFUSION_SCHEDULE, check_int
from lcm.sample import Sampler


def run_timesteps(args: argparse.Namespace) -> int:
    from lcm.maths.schedule import NoiseSchedule
    from lcm.maths.timesteps import ddim_timesteps, dpm_solver_timesteps, lcm_timesteps

    check_int(args.original_steps, "--original-steps", 1, 1000)
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
    schedule = NoiseSchedule.from_config(config)
    num_train = schedule.num_train_timesteps
    if args.sampler == "lcm":
        ts = lcm_timesteps(args.steps, args.original_steps, num_train)
    elif args.sampler == "ddim":
        ts = ddim_timesteps(
            args.steps, num_train, config.get("timestep_spacing", "leading"), config.get("steps_offset", 0)
        )
    else:
        ts = dpm_solver_timesteps(
            args.steps, schedule, config.get("timestep_spacing", "linspace"), config.get("steps_offset", 0)
        )
    alpha, sigma = schedule.alpha_sigma(ts)
    print(f"{'t':>4}  {'alpha_t':>8}  {'sigma_t':>8}")
    for t, a, s in zip(ts.tolist(), alpha.tolist(), sigma.tolist(), strict=True):
        print(f"{t:>4d}  {a:8.6f}  {s:8.6f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "timesteps",
        help="print a sampler's timesteps with their alpha_t and sigma_t",
        description="Print the timesteps a sampler visits, exactly as the installed diffusers scheduler would.",
    )
    p.add_argument("--sampler", choices=[s.value for s in Sampler], default="lcm", help="sampler (default lcm)")
    p.add_argument("--steps", type=int, default=4, help="number of sampling steps (default 4)")
    p.add_argument(
        "--original-steps",
        type=int,
        default=50,
        help="LCM only: N, the number of skipping-grid timesteps the LCM was distilled on (default 50)",
    )
    p.add_argument(
        "--scheduler-config",
        type=argparse.FileType("r"),
        help="a diffusers scheduler_config.json (default: Stable Diffusion's scaled-linear schedule)",
    )
    p.set_defaults(func=run_timesteps)
