"""``lcm pairs``: the teacher's samples and the noise they came from, for ``lcm distill --regression-pairs``."""

from __future__ import annotations

import argparse
import dataclasses

from lcm.cli.common import check_int
from lcm.config.method import LCDConfig
from lcm.limits import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_STEPS

TEACHER_SAMPLERS = ("dpm", "dpmpp", "ddim")  # a VP teacher's
SAVE_EVERY_S = 60.0  # the file is rewritten at most this often while pairs are made (and at the end)


def run_pairs(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from lcm.evaluation.prompts import load_prompts
    from lcm.models.fast import parse_device
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.shipped import default_model_path
    from lcm.training.regression import load_pairs, make_pairs, save_pairs

    check_int(args.count, "--count", 1, MAX_IMAGES)
    check_int(args.steps, "--steps", 1, MAX_STEPS)
    check_int(args.seed, "--seed", 0, MAX_SEED // 1_000_000 - 1)
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    if not args.w_min <= args.w_max or args.w_min < 0:
        raise ValueError(f"--w-min and --w-max: need 0 ≤ w-min ≤ w-max, got {args.w_min:g} and {args.w_max:g}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: give a FILE.safetensors")
    teacher_path = args.teacher or str(default_model_path())
    about = {"teacher": teacher_path, "sampler": args.sampler, "steps": args.steps, "w_min": args.w_min}
    about |= {"w_max": args.w_max, "seed": args.seed, "prompts": args.prompts}
    old = load_pairs(out) if out.is_file() else None
    if old is not None and old.about != about:
        changed = sorted(k for k in about if old.about.get(k) != about[k])
        raise ValueError(f"--out {out} holds pairs made with other {', '.join(changed)}: give another --out")
    if old is not None and len(old) >= args.count:
        print(f"{out} already holds {len(old)} pairs")
        return 0
    teacher = LatentDiffusion.from_pretrained(teacher_path, device=parse_device(args.device))
    if teacher.is_lcm or teacher.is_flow:
        raise ValueError(f"--teacher {teacher_path}: pairs are made by a (non-flow) diffusion teacher, not an LCM")
    prompts = load_prompts(args.prompts, args.count, args.seed, args.caption_column).prompts
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=args.count, initial=0 if old is None else len(old), desc="pairs", unit="pair")
    last_save = time.monotonic()

    def keep(pairs) -> None:
        nonlocal last_save
        bar.update(len(pairs) - bar.n)
        if time.monotonic() - last_save > SAVE_EVERY_S:
            save_pairs(out, pairs)
            last_save = time.monotonic()

    pairs = make_pairs(teacher, prompts, about, old, args.batch_size, keep)
    bar.close()
    save_pairs(out, pairs)
    print(f"{len(pairs)} pairs written to {out}")
    print(f"train with them: lcm distill --teacher {teacher_path} --regression-pairs {out} --regression-weight 1 ...")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pairs",
        help="the teacher's samples and their noise, for lcm distill's regression term (--regression-pairs)",
        description=(
            "Sample the teacher once per prompt and keep each sample with the noise it started from: the pairs "
            "`lcm distill --regression-pairs FILE --regression-weight λ` regresses the student's 1-step sample onto "
            "(docs/methods.md §6). Pair i's noise and w come from the generator of seed SEED·1,000,000 + i (w "
            "uniform in [--w-min, --w-max]), its prompt is prompt i of --prompts, and its sample is the teacher's "
            "--sampler at --steps steps with classifier-free guidance at w. The file is saved every minute; run "
            "the same command again to resume an interrupted run, or with a larger --count to add pairs."
        ),
    )
    p.add_argument("--out", required=True, help="the pairs file to write (FILE.safetensors)")
    p.add_argument("--teacher", help="the teacher to sample (default: the shipped Fashion teacher)")
    p.add_argument("--count", type=int, default=10_000, help="how many pairs (default 10000)")
    p.add_argument(
        "--prompts",
        default="embedded",
        help="prompts: embedded (random captions of the Fashion classes), a .txt file (one a line), or an "
        "image-caption data set (any lcm distill --data string; its captions); cycled if shorter (default embedded)",
    )
    p.add_argument("--caption-column", help="caption column of a --prompts data set")
    p.add_argument(
        "--sampler", choices=TEACHER_SAMPLERS, default="dpm", help="the teacher's sampler (default dpm: DPM-Solver)"
    )
    p.add_argument("--steps", type=int, default=25, help="the teacher's steps (default 25)")
    w = {f.name: f.default for f in dataclasses.fields(LCDConfig) if f.name in ("w_min", "w_max")}
    p.add_argument(
        "--w-min", type=float, default=w["w_min"], help=f"lowest w, as lcm distill's (default {w['w_min']:g})"
    )
    p.add_argument(
        "--w-max", type=float, default=w["w_max"], help=f"highest w, as lcm distill's (default {w['w_max']:g})"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=7,
        help="pair i's noise seed is SEED·1,000,000 + i; lcm eval's seeds 0 and 1 use other noise (default 7)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="pairs per teacher batch (default 64)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run_pairs)
