"""The ``lcm`` command line. Arguments are parsed and validated here, and nowhere below."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__

# Stable Diffusion 1.x/2.x's training schedule, used where no scheduler config is given.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _cmd_demo(args: argparse.Namespace) -> int:
    print(
        "lcm demo distils the embedded Fashion-MNIST teacher into a few-step LCM and compares it with the teacher.\n"
        "That teacher is not shipped in this version yet; what exists today is the core maths, tested against\n"
        "diffusers (run the tests), and `lcm timesteps` to inspect the samplers' schedules."
    )
    return 0


def _cmd_timesteps(args: argparse.Namespace) -> int:
    from .schedule import NoiseSchedule
    from .timesteps import ddim_timesteps, dpm_solver_timesteps, lcm_timesteps

    config = json.loads(args.scheduler_config.read()) if args.scheduler_config else STABLE_DIFFUSION_SCHEDULE
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm",
        description="Latent Consistency Models: distil a latent diffusion model into a 1-4 step generator.",
    )
    parser.add_argument("--version", action="version", version=f"lcm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="distil the embedded Fashion-MNIST teacher and compare (see its --help)")
    demo.set_defaults(func=_cmd_demo)

    ts = sub.add_parser(
        "timesteps",
        help="print a sampler's timesteps with their alpha_t and sigma_t",
        description="Print the timesteps a sampler visits, exactly as the installed diffusers scheduler would.",
    )
    ts.add_argument("--sampler", choices=["lcm", "ddim", "dpm", "dpmpp"], default="lcm", help="sampler (default lcm)")
    ts.add_argument("--steps", type=int, default=4, help="number of sampling steps (default 4)")
    ts.add_argument(
        "--original-steps",
        type=int,
        default=50,
        help="LCM only: N, the number of skipping-grid timesteps the LCM was distilled on (default 50)",
    )
    ts.add_argument(
        "--scheduler-config",
        type=argparse.FileType("r"),
        help="a diffusers scheduler_config.json (default: Stable Diffusion's scaled-linear schedule)",
    )
    ts.set_defaults(func=_cmd_timesteps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one line the user can act on
        print(f"lcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
