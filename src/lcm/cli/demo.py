"""``lcm demo``: distil the shipped teacher on the CPU and compare the LCM with it."""

from __future__ import annotations

import argparse

from lcm.cli.common import check_int
from lcm.cli.flags import add_knob_flags, typed_settings
from lcm.config.recipes import RECIPES
from lcm.limits import MAX_IMAGES

# The few settings of a recipe the demo lets a user change (every other one is the recipe's).
DEMO_FLAGS = ("loop.max_steps", "data.batch_size", "method.solver", "loop.seed", "data.data_dir", "loop.compile")


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcm.demo import demo_config, run_demo
    from lcm.shipped import flow_teacher_path

    check_int(args.eval_samples, "--eval-samples", 2, MAX_IMAGES)
    teacher = flow_teacher_path() if args.teacher == "flow" else args.teacher
    if teacher is not None and not Path(teacher).is_dir():
        raise ValueError(f"--teacher {teacher}: no such folder (give a teacher folder, or flow for the shipped one)")
    recipe = "quick" if args.quick else args.recipe
    run_demo(demo_config(Path(args.out), recipe, typed_settings(args), args.eval_samples, teacher))
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
        choices=[r for r in RECIPES if r != "quick"],
        default="demo",
        help="distillation recipe (docs/fidelity.md): demo (default, 750 steps: 5 minutes end to end on 2 AMD EPYC "
        "cores, about 10 on slower 2-core CPUs), demo-1500 (twice the steps, the demo until it was halved), long "
        "(10,000 compiled steps, under an hour; closer to the teacher at 1-2 steps) or before-fidelity (the demo "
        "recipe before docs/fidelity.md, the base of the ablation scripts)",
    )
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (20 steps, 100 images per row)")
    p.add_argument("--eval-samples", type=int, help="images per table row (default: the recipe's, 1000 for demo)")
    p.add_argument(
        "--teacher",
        help="flow: the shipped flow-matching teacher (an SD3-class MMDiT, distilled at w = 3); or a Fashion teacher "
        "folder from lcm train-teacher (default: the shipped UNet teacher)",
    )
    add_knob_flags(p, DEMO_FLAGS, default="the recipe's")
    p.set_defaults(func=run_demo)
