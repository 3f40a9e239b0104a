"""Few-step fidelity and w control of LCD recipes on the embedded teacher, several seeds each (docs/fidelity.md).

    python scripts/fidelity_ablation.py --out runs/fidelity --variants demo,k50 --seeds 0,1 [--cache CACHE]
    python scripts/fidelity_ablation.py --out runs/fidelity --report      # table of every finished run

Every variant is a set of `lcm distill` settings over one base (the `lcm demo` recipe before this ablation: k = 20,
1,500 steps of batch 32); a variant changes only what its name says. Each (variant, seed) pair distils into
OUT/VARIANT-sSEED and is scored with the same prompts and initial noise: the LCM at w = 3 with 1, 2 and 4 steps, and
at 4 steps for w = 1, 2, 4, 5 (the w control), 2,000 images per row, FD-clf and prompt accuracy (the shipped
classifier's features against the 10,000 test images; not FID). The teacher's reference rows (DPM-Solver 25 steps and
DDIM 1 step at w = 3; DPM-Solver++ 8 steps at each w) are computed once into OUT/teacher/results.json. Every
row is a record of `lcm eval`'s results.json schema. Runs that finished are
kept, so the command resumes; several processes may work on different variants of one OUT at once.

With ``--cache`` (an `lcm cache` folder of the shipped teacher) the runs read cached latents: the same distribution
as encoding each batch, faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lcm.config.recipes import recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import load_results
from lcm.evaluation.run import Row, evaluate_rows
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler
from lcm.shipped import default_model_path
from lcm.training.runs import run_training

BASE = "before-fidelity"  # the lcm demo recipe before this ablation (lcm.config.recipes): k = 20, a constant rate

# name → dotted overrides of the base (lcm.config.knobs.override)
VARIANTS: dict[str, dict] = {
    "demo": {},  # the lcm demo recipe before this ablation: k = 20
    "k50": {"method.num_solver_steps": 20},
    "k100": {"method.num_solver_steps": 10},
    "k200": {"method.num_solver_steps": 5},  # N = 5: an LCM of at most 5 steps
    "k100-dpmpp": {"method.num_solver_steps": 10, "method.solver": "dpmpp"},  # 2nd-order teacher step, 2 calls
    "k100-wlr10": {"method.num_solver_steps": 10, "method.w_lr_scale": 10.0},  # the w projection learns 10x faster
    "ema0": {"method.ema_decay": 0.0},  # target = the student under stop-gradient (no EMA)
    # the demo recipe with the long recipe's learning-rate schedule (cosine to 10% after 100 warm-up steps), at the
    # demo's 1,500 steps and at 1,000 (two thirds of the demo's distillation time)
    "k100-wlr10-cos": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    "k100-wlr10-cos1000": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
        "loop.max_steps": 1000,
    },
    "k100-wlr30": {"method.num_solver_steps": 10, "method.w_lr_scale": 30.0},  # the w projection 30x faster
    # the cosine schedule with the w projection at 20x: over the run its rate averages about 11x the base rate
    "k100-wlr20-cos": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 20.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    # DPM-Solver++ teacher step (k100-dpmpp's 4-step images) with the cosine schedule and the w projection at 10x
    "k100-dpmpp-wlr10-cos": {
        "method.num_solver_steps": 10,
        "method.solver": "dpmpp",
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    # timestep bias: t_{n+k} drawn ∝ i (the i-th grid point), so t = 999 twice as often as under a uniform draw
    "k100-wlr10-tbias1": {"method.num_solver_steps": 10, "method.w_lr_scale": 10.0, "method.timestep_bias": 1.0},
    # the consistency distance: squared error instead of pseudo-Huber (c = 0.001 per element, nearly an L1 loss on
    # latents of unit scale)
    "k100-wlr10-l2": {"method.num_solver_steps": 10, "method.w_lr_scale": 10.0, "method.loss": "l2"},
    # skip curriculum: the demo recipe's k = 100 for the first 1,000 steps, then k = 20 (the grid it samples on)
    "k100to20-wlr10": {
        "method.num_solver_steps": 50,
        "method.coarse_num_solver_steps": 10,
        "method.coarse_steps": 1000,
        "method.w_lr_scale": 10.0,
    },
    # mixed skips: half of every batch on the k = 100 grid (fast propagation to the top), half on k = 20 (the finer
    # teacher step), sampled on the k = 20 grid; and the same with three quarters on k = 100
    "mix20-100-p50-wlr10-cos": {
        "method.num_solver_steps": 50,
        "method.coarse_num_solver_steps": 10,
        "method.coarse_fraction": 0.5,
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    "mix20-100-p75-wlr10-cos": {
        "method.num_solver_steps": 50,
        "method.coarse_num_solver_steps": 10,
        "method.coarse_fraction": 0.75,
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    # the target's EMA rate μ around the demo recipe's 0.95: a target that lags the student by about 10 steps
    # instead of 20 (consistency climbs the trajectory faster, from a noisier target), and one that lags by 100
    "k100-wlr10-cos-ema90": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 10.0,
        "method.ema_decay": 0.9,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    "k100-wlr10-cos-ema99": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 10.0,
        "method.ema_decay": 0.99,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    # mixed skips (p = 0.5) with the slower target: the two changes that helped the bottom and the top, together
    "mix20-100-p50-wlr10-cos-ema99": {
        "method.num_solver_steps": 50,
        "method.coarse_num_solver_steps": 10,
        "method.coarse_fraction": 0.5,
        "method.w_lr_scale": 10.0,
        "method.ema_decay": 0.99,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
    },
    # the demo recipe with a LoRA student of rank 8 (a quarter to an eighth of the teacher's 32-64 channels, as rank
    # 64 is of SD's 320-1280) at 5x the full student's rate: the student is its own target and takes no w input
    "lora8-k100-cos": {
        "method.num_solver_steps": 10,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 100,
        "optim.learning_rate": 0.001,
        "student.kind": "lora",
        "student.lora_rank": 8,
    },
    # the demo recipe at batch 64 for 750 steps: the same images, half the optimiser steps (with two threads per
    # process, samples/s is flat in the batch size on this CPU)
    "b64-k100-wlr10-cos": {
        "method.num_solver_steps": 10,
        "method.w_lr_scale": 10.0,
        "optim.lr_schedule": "cosine_floor",
        "optim.lr_warmup_steps": 50,
        "loop.max_steps": 750,
        "data.batch_size": 64,
    },
}

W_EVAL = 3.0
W_CONTROL = (1.0, 2.0, 4.0, 5.0)
EVAL_SAMPLES = 2000


def lcm_rows() -> list[Row]:
    rows = [Row("LCM", Sampler.LCM, s, W_EVAL) for s in (1, 2, 4)]
    return rows + [Row("LCM", Sampler.LCM, 4, w) for w in W_CONTROL]


def teacher_rows() -> list[Row]:
    rows = [
        Row("teacher DPM-Solver", Sampler.DPM_SOLVER_2M, 25, W_EVAL, "trailing"),
        Row("teacher DDIM", Sampler.DDIM, 1, W_EVAL, "trailing"),
    ]
    return rows + [Row("teacher DPM-Solver++", Sampler.DPM_SOLVER_PP_2M, 8, w, "trailing") for w in (1, 2, 3, 4, 5)]


def scored(out: Path, lcm_runs: bool = True) -> dict[str, list[dict]]:
    """{variant: [{(method, steps, w): metrics} per finished seed]} of OUT, or {"teacher": [...]} for its rows."""
    found: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-s*/results.json") if lcm_runs else out.glob("teacher/results.json")):
        records = load_results(path)[1]
        if len(records) == len(lcm_rows() if lcm_runs else teacher_rows()):
            variant = path.parent.name.rsplit("-s", 1)[0] if lcm_runs else "teacher"
            found.setdefault(variant, []).append({(r.method, r.steps, r.w): r.metrics for r in records})
    return found


def distil(out: Path, variant: str, seed: int, cache: Path | None) -> dict:
    run_dir = out / f"{variant}-s{seed}"
    changes = {"loop.seed": seed, "loop.report_to": [], **VARIANTS[variant]}
    if cache:
        changes["data.source"] = str(cache)
    cfg = recipe_config(BASE, changes)
    every = {"loop.checkpoint_every": cfg.loop.max_steps, "loop.log_every": max(cfg.loop.max_steps // 50, 1)}
    summary = run_training(recipe_config(BASE, {**changes, **every}), run_dir, resume="auto")
    (run_dir / "wall_seconds.json").write_text(json.dumps({"train_wall_seconds": summary["wall_seconds"]}) + "\n")
    return summary


def report(out: Path) -> str:
    teacher = scored(out, lcm_runs=False)["teacher"][0]
    best, ddim1 = teacher["teacher DPM-Solver", 25, 3.0]["fd_clf"], teacher["teacher DDIM", 1, 3.0]["fd_clf"]
    t_acc = {w: teacher["teacher DPM-Solver++", 8, w]["prompt_accuracy"] for w in (1.0, 2.0, 3.0, 4.0, 5.0)}
    t_fd = {w: teacher["teacher DPM-Solver++", 8, w]["fd_clf"] for w in (1.0, 5.0)}
    runs = scored(out)

    def cell(values: list[float], fmt: str) -> str:
        mean = statistics.fmean(values)
        spread = f" ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else ""
        return f"{mean:{fmt}}{spread}"

    header = ["recipe", "seeds", "FD-clf 1", "FD-clf 2", "FD-clf 4", "1 ÷ DDIM-1", "2 ÷ best", "4 ÷ best"]
    header += [*(f"acc w={w}" for w in (1, 2, 3, 4, 5)), "max acc gap", "FD-clf 4, w=1", "FD-clf 4, w=5"]
    rows = []
    for variant, seeds in sorted(runs.items(), key=lambda kv: list(VARIANTS).index(kv[0]) if kv[0] in VARIANTS else 99):
        fd = {s: [r["LCM", s, W_EVAL]["fd_clf"] for r in seeds] for s in (1, 2, 4)}
        acc = {w: [r["LCM", 4, w]["prompt_accuracy"] for r in seeds] for w in t_acc}
        gap = [max(abs(r["LCM", 4, w]["prompt_accuracy"] - t_acc[w]) for w in t_acc) for r in seeds]
        fd_w = {w: [r["LCM", 4, w]["fd_clf"] for r in seeds] for w in (1.0, 5.0)}
        ratios = [statistics.fmean(fd[1]) / ddim1, statistics.fmean(fd[2]) / best, statistics.fmean(fd[4]) / best]
        rows.append(
            [variant, len(seeds), *(cell(fd[s], ".1f") for s in (1, 2, 4)), *(f"{x:.2f}" for x in ratios)]
            + [*(cell(acc[w], ".3f") for w in t_acc), cell(gap, ".3f"), cell(fd_w[1.0], ".1f")]
            + [cell(fd_w[5.0], ".1f")]
        )
    teacher_row = ["teacher DPM-Solver++ 8 steps", *["—"] * 7, *(f"{t_acc[w]:.3f}" for w in t_acc)]
    rows.append([*teacher_row, "—", f"{t_fd[1.0]:.1f}", f"{t_fd[5.0]:.1f}"])
    intro = (
        f"Teacher's best row (DPM-Solver 25 steps, w = 3): FD-clf {best:.1f}; teacher DDIM 1 step: {ddim1:.1f}. "
        "Mean ± half the range over seeds.\n\n"
    )
    return intro + markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--cache", type=Path, help="an lcm cache folder of the shipped teacher")
    p.add_argument("--teacher", action="store_true", help="also score the teacher's reference rows (once per OUT)")
    p.add_argument("--report", action="store_true", help="only write OUT/fidelity.md from finished runs")
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report:
        prompts, settings = fashion_eval_prompts(EVAL_SAMPLES, 0), EvalSettings(num_samples=EVAL_SAMPLES)
        evaluator = FashionEvaluator(default_model_path() / "classifier")
        for variant in variants:
            for seed in (int(s) for s in a.seeds.split(",")):
                run_dir = a.out / f"{variant}-s{seed}"
                if not (run_dir / "wall_seconds.json").is_file():
                    distil(a.out, variant, seed, a.cache)
                lcm = LatentDiffusion.from_pretrained(run_dir)
                evaluate_rows(lcm, lcm_rows(), prompts, evaluator, run_dir / "results.json", settings)
        if a.teacher:
            teacher = LatentDiffusion.from_pretrained(default_model_path())
            evaluate_rows(teacher, teacher_rows(), prompts, evaluator, a.out / "teacher" / "results.json", settings)
    table = report(a.out)
    (a.out / "fidelity.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
