"""``lcm eval``: the paper's table, w sweeps and plots."""

from __future__ import annotations

import argparse
import inspect

from lcm.cli.common import add_lora_flags, check_int, float_list, int_list, lora_specs
from lcm.config.sampling import SampleConfig
from lcm.evaluation.plan import TEACHER_SPACINGS, plan_eval
from lcm.limits import MAX_BATCH, MAX_IMAGES, MAX_SEED

# The defaults are plan_eval's (the Python API's), stated once there; the flags show them.
DEFAULT = {name: p.default for name, p in inspect.signature(plan_eval).parameters.items()}


def _listed(values) -> str:
    return ",".join(map(str, values))


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcm.evaluation.run import run_eval

    check_int(args.num_samples, "--num-samples", 2, MAX_IMAGES)  # a covariance needs two images
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.reference_samples, "--reference-samples", 1, MAX_IMAGES)
    check_int(args.seed, "--seed", 0, MAX_SEED)
    if args.gamma is not None:
        SampleConfig(gamma=args.gamma)  # its range, one line naming --gamma
    if args.sweep_w:
        ws = float_list(args.sweep_w, "--sweep-w")
    elif args.w is not None:
        ws = float_list(str(args.w), "--w")
    else:
        ws = None
    plan = plan_eval(
        out=Path(args.out),
        teacher=args.teacher,
        teacher_samplers=None
        if args.teacher_samplers is None
        else [x.strip() for x in args.teacher_samplers.split(",") if x.strip()],
        teacher_steps=int_list(args.teacher_steps, "--teacher-steps"),
        lcms=[(folder, name or None) for folder, _, name in (spec.partition("=") for spec in args.lcm or [])],
        lcm_steps=int_list(args.lcm_steps, "--lcm-steps"),
        loras=lora_specs(args),
        teacher_spacing=args.teacher_spacing,
        ws=ws,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        prompts=args.prompts,
        caption_column=args.caption_column,
        reference=args.reference,
        image_column=args.image_column,
        split=args.split,
        reference_samples=args.reference_samples,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        classifier=args.classifier,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        device=args.device,
        overwrite=args.overwrite,
        gamma=args.gamma,
    )
    run_eval(plan)
    print(f"\ntable: {plan.out / 'results.md'}\nrows: {plan.out / 'results.json'}\nplots: {plan.out}/*.png")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the paper's table: teacher DDIM / DPM-Solver / DPM-Solver++ and LCMs at 1-8 steps, w sweeps, plots",
        description=(
            "Evaluate a teacher's DDIM, DPM-Solver and DPM-Solver++ sampling and one or more LCMs (full or LoRA) at "
            "each number of steps, with the same prompts and per-image seeds in every row. On the embedded default "
            "the metrics are FD-clf, KID-clf (the shipped classifier's features, not FID) and prompt accuracy; for "
            "other models FID/KID (FID Inception-v3) and CLIP score. Writes results.json (rerunning reuses finished "
            "rows), results.md (the paper's layout) and PNG plots to --out."
        ),
    )
    p.add_argument("--teacher", help="teacher folder or hub id (default: the shipped Fashion teacher)")
    p.add_argument(
        "--lcm", action="append", metavar="PATH[=NAME]", help="an LCM or LCM-LoRA folder to evaluate; repeatable"
    )
    add_lora_flags(
        p,
        "--teacher",
        ". The stack is one more method: rows 'LoRA stack' at --lcm-steps with an LCM-LoRA among them, else "
        "'teacher SAMPLER + LoRA' rows with the teacher samplers",
    )
    teacher_steps, lcm_steps = (_listed(DEFAULT[k]) for k in ("teacher_steps", "lcm_steps"))
    p.add_argument(
        "--teacher-samplers",
        help="teacher samplers, comma-separated; '' for none (default ddim,dpm,dpmpp; for a flow-matching teacher "
        "ddim,heun: Euler, the flow's DDIM, and Heun)",
    )
    p.add_argument("--teacher-steps", default=teacher_steps, help=f"teacher steps (default {teacher_steps})")
    p.add_argument("--lcm-steps", default=lcm_steps, help=f"LCM steps (default {lcm_steps})")
    p.add_argument(
        "--teacher-spacing",
        choices=TEACHER_SPACINGS,
        default=DEFAULT["teacher_spacing"],
        help=f"timesteps of the teacher samplers (default {DEFAULT['teacher_spacing']}: every command's rule, every "
        "schedule starts at t = T-1, so 1-2 step rows are meaningful), or config (the teacher's scheduler config)",
    )
    p.add_argument(
        "--w", type=float, help="guidance w of every row (default: 3 for the Fashion teacher, 6.5 for others)"
    )
    p.add_argument("--sweep-w", help="comma-separated w values: every row at each w, plus the trade-off plot")
    p.add_argument(
        "--gamma",
        type=float,
        help="TCD's γ in [0, 1] for the --lcm models that sample with TCD's sampler (TCD, multi-phase PCM); their "
        "rows are named 'NAME γ G' (default: each model's own: 0.3 for TCD, 0 for PCM)",
    )
    for flag, name, text in (
        ("--num-samples", "num_samples", "images per row"),
        ("--seed", "seed", "prompt and noise seed; image i uses seed*1e6 + i"),
        ("--batch-size", "batch_size", "images per sampling batch"),
    ):
        p.add_argument(flag, type=int, default=DEFAULT[name], help=f"{text} (default {DEFAULT[name]})")
    _add_data_and_metric_flags(p.add_argument_group("prompts, reference and metrics"))
    p.set_defaults(func=run_eval)


def _add_data_and_metric_flags(p) -> None:
    p.add_argument(
        "--prompts",
        help="'embedded' (Fashion captions, the default for the Fashion teacher), a .txt file with a prompt a line, "
        "or an image-caption data set as for lcm distill --data",
    )
    p.add_argument("--caption-column", help="caption column of a --prompts data set")
    p.add_argument(
        "--reference",
        help="reference of FD/FID/KID: 'embedded' (Fashion test split), a data set of images (default: --prompts "
        "when it is one), or FID statistics (.npz with mu/sigma, .safetensors with mean/cov)",
    )
    p.add_argument("--image-column", help="image column of a --reference data set")
    split, references = DEFAULT["split"], DEFAULT["reference_samples"]
    p.add_argument("--split", default=split, help=f"split of --prompts / --reference data sets (default {split})")
    p.add_argument(
        "--reference-samples",
        type=int,
        default=references,
        help=f"images read from a --reference data set ({references})",
    )
    p.add_argument(
        "--metrics",
        help="comma-separated from fd-clf, kid-clf, accuracy, fid, kid, clip (default: fd-clf,kid-clf,accuracy on "
        "the embedded default, else fid,kid,clip)",
    )
    p.add_argument("--classifier", help="Fashion classifier folder for fd-clf/kid-clf/accuracy (default: teacher's)")
    p.add_argument(
        "--inception-weights",
        help="FID Inception-v3 weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
        "default: download it",
    )
    p.add_argument(
        "--clip-model", help="CLIP model id or folder for --metrics clip (default openai/clip-vit-large-patch14)"
    )
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="lcm-eval", help="output folder (default lcm-eval)")
    p.add_argument("--overwrite", action="store_true", help="discard rows of an earlier run with other settings")
