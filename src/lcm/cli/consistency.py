"""``lcm distill`` (LCD) and ``lcm finetune`` (LCF): the two consistency trainings share their flags."""

from __future__ import annotations

import argparse

from lcm.cli.common import (
    add_consistency_args,
    add_training_args,
    check_consistency_flags,
    check_float,
    data_config,
    loop_config,
    lora_settings,
    recorded_flags,
    settle_flags,
    validation_prompts,
)
from lcm.maths.solvers import Solver


def run_distill(args: argparse.Namespace) -> int:
    from lcm.models.student import StudentKind
    from lcm.sample import default_model_path
    from lcm.training.lcd import LCDConfig
    from lcm.training.runs import run_distillation

    settle_flags(args, "distill")
    check_consistency_flags(args)
    check_float(args.w_min, "--w-min", 0)
    check_float(args.w_max, "--w-max", 0)
    check_float(args.w_lr_scale, "--w-lr-scale", 0, open_low=True)
    if args.w_min > args.w_max:
        raise ValueError(f"--w-min must not exceed --w-max, got --w-min {args.w_min} > --w-max {args.w_max}")
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.student == "lora" else 1e-6
    loop, data = loop_config(args, args.learning_rate), data_config(args)
    teacher = args.teacher or str(default_model_path())
    lcd = LCDConfig(
        num_solver_steps=args.num_solver_steps,
        solver=args.solver,
        w_min=args.w_min,
        w_max=args.w_max,
        loss=args.loss,
        huber_c=args.huber_c,
        ema_decay=args.ema_decay,
        w_lr_scale=args.w_lr_scale,
        coarse_num_solver_steps=args.coarse_num_solver_steps,
        coarse_steps=args.coarse_steps,
        coarse_fraction=args.coarse_fraction,
        timestep_bias=args.timestep_bias,
    )
    summary = run_distillation(
        teacher,
        data,
        lcd,
        loop,
        student=StudentKind(args.student),
        lora=lora_settings(args),
        gradient_checkpointing=args.gradient_checkpointing,
        validation_prompts=validation_prompts(args, args.teacher is None),
        validation_w=args.validation_w,
        flags=recorded_flags(args),
    )
    print(f"distilled {summary['steps']} steps in {summary['wall_seconds']:.0f} s; model in {args.out}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from lcm.models.student import StudentKind
    from lcm.training.lcf import LCFConfig
    from lcm.training.runs import run_finetune

    settle_flags(args, "finetune")
    if not args.model:
        raise ValueError("--model is required: the LCM folder to fine-tune (a resumed run reads it from its settings)")
    check_consistency_flags(args)
    check_float(args.lcf_w, "--lcf-w", 0)
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.student == "lora" else 1e-5
    loop, data = loop_config(args, args.learning_rate), data_config(args)
    lcf = LCFConfig(
        num_solver_steps=args.num_solver_steps,
        w=args.lcf_w,
        loss=args.loss,
        huber_c=args.huber_c,
        ema_decay=args.ema_decay,
    )
    summary = run_finetune(
        args.model,
        data,
        lcf,
        loop,
        student=StudentKind(args.student),
        lora=lora_settings(args),
        gradient_checkpointing=args.gradient_checkpointing,
        validation_prompts=validation_prompts(args, args.data.startswith("fashion-mnist")),
        validation_w=args.validation_w,
        flags=recorded_flags(args),
    )
    print(f"fine-tuned {summary['steps']} steps in {summary['wall_seconds']:.0f} s; model in {args.out}")
    return 0


def add_parser(sub) -> None:
    ds = sub.add_parser(
        "distill",
        help="Latent Consistency Distillation of a teacher into a few-step LCM (full UNet or LCM-LoRA)",
        description=(
            "Distil a diffusers-format latent diffusion model (SD 1.x/2.x epsilon or v, SDXL, or the embedded "
            "Fashion teacher) into an LCM by consistency distillation over the guidance-augmented PF-ODE. "
            "Runs on many GPUs with `accelerate launch -m lcm.cli distill ...`. The export lands in --out, the "
            "training state in --out/train; `lcm distill --out RUN --resume latest` continues a run."
        ),
    )
    ds.add_argument("--teacher", help="teacher model folder or hub id (default: the shipped Fashion teacher)")
    m = add_consistency_args(ds, "LCD")
    m.add_argument("--solver", choices=[s.value for s in Solver], default="ddim", help="ODE solver of the teacher")
    m.add_argument("--w-min", type=float, default=2.0, help="smallest guidance w drawn (paper's w; default 2)")
    m.add_argument("--w-max", type=float, default=14.0, help="largest guidance w drawn (default 14)")
    m.add_argument(
        "--w-lr-scale",
        type=float,
        default=1.0,
        help="learning-rate multiplier of the full student's zero-initialised w projection (default 1; "
        "docs/fidelity.md)",
    )
    m.add_argument(
        "--coarse-num-solver-steps",
        type=int,
        help="skip curriculum, coarse to fine: the first --coarse-steps optimiser steps draw their (t_{n+k}, t_n) "
        "pairs on a grid of this many points (a larger skip k), the rest on --num-solver-steps, which the LCM "
        "samples on (default: none; docs/fidelity.md)",
    )
    m.add_argument(
        "--coarse-steps", type=int, default=0, help="optimiser steps on the coarse grid (default 0: no curriculum)"
    )
    m.add_argument(
        "--coarse-fraction",
        type=float,
        default=0.0,
        help="mixed skips: after the --coarse-steps, draw each pair on the --coarse-num-solver-steps grid with this "
        "probability, otherwise on the --num-solver-steps grid (default 0: never; docs/fidelity.md)",
    )
    m.add_argument(
        "--timestep-bias",
        type=float,
        default=0.0,
        help="draw the skipping grid's i-th point (i = 1 … N, ascending t) as t_{n+k} with probability ∝ i^γ: "
        "0 (default) is the paper's uniform draw; 1 draws the top point (t = T - 1) N times as often as the lowest, "
        "about twice as often as a uniform draw "
        "(docs/fidelity.md)",
    )
    add_training_args(ds, lr_help="default 1e-6 for a full student, 1e-4 for LoRA, as diffusers' scripts", steps=1000)
    ds.set_defaults(func=run_distill)

    ft = sub.add_parser(
        "finetune",
        help="Latent Consistency Fine-tuning: adapt an LCM to your image-caption data without a teacher",
        description=(
            "Teacher-free consistency fine-tuning (LCF) of an LCM made by lcm distill: both ends of each skipping "
            "step share one noise sample, the target is an EMA of the student. The LCM's guidance input is held at "
            "--lcf-w during fine-tuning (no teacher means no guided ODE to distil other w from)."
        ),
    )
    ft.add_argument("--model", help="(required) the LCM to fine-tune: a full LCM folder or an LCM-LoRA folder")
    f = add_consistency_args(ft, "LCF")
    f.add_argument(
        "--lcf-w",
        type=float,
        default=None,
        help="guidance w fed to the LCM while fine-tuning (default: the LCM's own default w, the middle of the range "
        "it was distilled on)",
    )
    add_training_args(ft, lr_help="default 1e-5 for a full student, 1e-4 for LoRA", steps=1000)
    ft.set_defaults(func=run_finetune)
