"""``lcm demo``: distil the shipped teacher on the CPU and compare the LCM with it."""

from __future__ import annotations

import argparse

from lcm.cli.common import check_int
from lcm.limits import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_STEPS
from lcm.maths.solvers import Solver


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcm.demo import demo_config_from, run_demo

    check_int(args.max_steps, "--max-steps", 1, MAX_STEPS)
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.eval_samples, "--eval-samples", 2, MAX_IMAGES)
    check_int(args.seed, "--seed", 0, MAX_SEED)
    cfg = demo_config_from(
        Path(args.out),
        args.quick,
        args.recipe,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        solver=args.solver,
        eval_samples=args.eval_samples,
        seed=args.seed,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        teacher=Path(args.teacher) if args.teacher else None,
        compile=args.compile,
    )
    run_demo(cfg)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="distil the shipped Fashion-MNIST teacher on the CPU and compare the LCM with it",
        description=(
            "Distil the shipped Fashion-MNIST teacher into an LCM (full UNet, LCD), then write a grid (rows: teacher "
            "DDIM at 1/2/4/8 steps, LCM at 1/2/4/8 steps) and a table of FD-clf, KID-clf and prompt accuracy. "
            "Rerunning resumes an interrupted distillation."
        ),
    )
    p.add_argument(
        "--out",
        default="lcm-demo",
        help="output folder (default lcm-demo; the LCM in OUT/lcm, its training state in OUT/lcm/train)",
    )
    p.add_argument(
        "--recipe",
        choices=("demo", "long"),
        default="demo",
        help="distillation recipe (docs/fidelity.md): demo (default, about 10 minutes on 2 CPU cores end to end) or "
        "long (10,000 compiled steps, under an hour; closer to the teacher at 1-2 steps)",
    )
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (20 steps, 100 images per row)")
    p.add_argument("--max-steps", type=int, help="LCD steps (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="LCD batch size (default 32)")
    p.add_argument("--solver", choices=[s.value for s in Solver], help="ODE solver of distillation (default ddim)")
    p.add_argument("--eval-samples", type=int, help="images per table row (default 1000)")
    p.add_argument("--seed", type=int, help="seed of distillation and evaluation (default 0)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    p.add_argument("--teacher", help="a Fashion teacher folder from lcm train-teacher (default: the shipped one)")
    p.add_argument(
        "--compile",
        choices=("on", "off"),
        help="torch.compile the student, target and teacher for distillation. off (default): eager. on: about "
        "3 minutes of compiling on a cold cache (kept in $LCM_CACHE/inductor; about 15 s later), then each step about "
        "1.25x faster, so it pays from the second run on; without a C++ compiler it trains eagerly. The README's "
        "table is the eager run's; a compiled run gives other last digits",
    )
    p.set_defaults(func=run_demo)
