"""``lcm eval``: the paper's table, w sweeps and plots."""

from __future__ import annotations

import argparse

from lcm.cli.common import cuda_available, float_list, int_list


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcm.evaluation.evaluate import EMBEDDED, EvalPlan, EvalSettings, Method
    from lcm.evaluation.metrics import METRICS
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.sample import Sampler, default_model_path

    teacher = args.teacher or str(default_model_path())
    samplers = [x for x in args.teacher_samplers.split(",") if x.strip()]
    if bad := [x for x in samplers if x not in ("ddim", "dpm", "dpmpp")]:
        raise ValueError(f"--teacher-samplers: unknown sampler(s) {bad}; choose from ddim, dpm, dpmpp")
    names = {"ddim": "DDIM", "dpm": "DPM-Solver", "dpmpp": "DPM-Solver++"}
    teacher_steps = int_list(args.teacher_steps, "--teacher-steps")
    methods = [Method(f"teacher {names[x]}", teacher, Sampler(x), teacher_steps) for x in samplers]
    lcm_steps = int_list(args.lcm_steps, "--lcm-steps")
    for spec in args.lcm or []:
        folder, _, name = spec.partition("=")
        if not Path(folder).exists() and "/" not in folder:
            raise ValueError(f"--lcm {folder}: no such folder")
        label = name or ("LCM" if len(args.lcm) == 1 else f"LCM ({Path(folder).name})")
        methods.append(Method(label, folder, Sampler.LCM, lcm_steps))
    if not methods:
        raise ValueError("nothing to evaluate: give --lcm and/or --teacher-samplers")
    if len({m.name for m in methods}) != len(methods):
        raise ValueError("two methods share a name; name each LCM with --lcm PATH=NAME")

    classifier = args.classifier
    embedded_teacher = Path(teacher, "classifier", "model.safetensors").is_file()
    if classifier is None and embedded_teacher:
        classifier = str(Path(teacher) / "classifier")
    prompts = args.prompts or (EMBEDDED if embedded_teacher else None)
    if prompts is None:
        raise ValueError("--prompts is required for this teacher: a .txt file (a prompt a line) or a data set")
    if args.metrics:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:
        metrics = ("fd-clf", "kid-clf", "accuracy") if prompts == EMBEDDED else ("fid", "kid", "clip")
    if bad := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"--metrics: unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if "accuracy" in metrics and prompts != EMBEDDED:
        raise ValueError("--metrics accuracy needs --prompts embedded (only those prompts name a class)")
    if args.reference:
        reference = args.reference
    elif prompts == EMBEDDED or not prompts.endswith(".txt"):
        reference = prompts  # the embedded test split, or the prompts' own data set
    elif all(METRICS[m][1] == "clip" for m in metrics):
        reference = "none"
    else:
        raise ValueError("--reference is required: reference images (a data set) or FID statistics (.npz/.safetensors)")
    if args.sweep_w:
        ws = float_list(args.sweep_w, "--sweep-w")
    elif args.w is not None:
        ws = float_list(str(args.w), "--w")
    else:
        ws = (LatentDiffusion.from_pretrained(teacher, with_text_encoder=False).default_w,)  # teacher's w
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs two images), got {args.num_samples}")
    settings = EvalSettings(
        prompts=prompts,
        caption_column=args.caption_column,
        num_samples=args.num_samples,
        seed=args.seed,
        metrics=metrics,
        reference=reference,
        reference_samples=args.reference_samples,
        split=args.split,
        image_column=args.image_column,
        teacher_spacing=args.teacher_spacing,
        classifier=classifier if any(METRICS[m][1] == "clf" for m in metrics) else None,
        inception_weights=args.inception_weights,
        clip_model=(args.clip_model or "openai/clip-vit-large-patch14") if "clip" in metrics else None,
    )
    plan = EvalPlan(
        methods=tuple(methods),
        ws=ws,
        settings=settings,
        out=Path(args.out),
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        device=args.device or ("cuda" if cuda_available() else "cpu"),
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )
    from lcm.evaluation.evaluate import run_eval

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
    p.add_argument(
        "--teacher-samplers", default="ddim,dpm,dpmpp", help="teacher samplers, comma-separated; '' for none"
    )
    p.add_argument("--teacher-steps", default="1,2,4,8,25,50", help="teacher steps (default 1,2,4,8,25,50)")
    p.add_argument("--lcm-steps", default="1,2,4,8", help="LCM steps (default 1,2,4,8)")
    p.add_argument(
        "--teacher-spacing",
        choices=["trailing", "leading", "linspace", "config"],
        default="trailing",
        help="timesteps of the teacher samplers: trailing (default; every schedule starts at t = T-1, so 1-2 step "
        "rows are meaningful), leading, linspace, or config (the teacher's scheduler config)",
    )
    p.add_argument(
        "--w", type=float, help="guidance w of every row (default: 3 for the Fashion teacher, 6.5 for others)"
    )
    p.add_argument("--sweep-w", help="comma-separated w values: every row at each w, plus the trade-off plot")
    p.add_argument("--num-samples", type=int, default=2000, help="images per row (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed; image i uses seed*1e6 + i (default 0)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (default 250)")
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
    p.add_argument("--split", default="train", help="split of --prompts / --reference data sets (default train)")
    p.add_argument(
        "--reference-samples", type=int, default=10_000, help="images read from a --reference data set (10000)"
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
    p.set_defaults(func=run_eval)
