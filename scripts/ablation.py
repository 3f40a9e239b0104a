"""The skipping-step × ODE-solver ablation of LCD (the paper's Figures 3 and 4) on the embedded teacher.

    python scripts/ablation.py --out runs/ablation [--k 1 5 10 20 50] [--solvers ddim dpm dpmpp] [--max-steps 600]

Every run is the "before-fidelity" recipe (lcm.config.recipes: the demo recipe before docs/fidelity.md changed it,
a constant rate and the w projection at the base rate) at the same budget (optimiser steps, batch, data order, seeds,
w range, learning rate); only the skipping step k (N = 1000 // k solver timesteps) and the solver Ψ differ. Each
LCM is then sampled at 1/2/4 steps with the same prompts and seeds and scored with FD-clf and prompt accuracy (the
shipped classifier's features vs the 10,000 test images; not FID).

Writes OUT/ablation.json (resumable: finished runs and rows are kept), OUT/ablation.md and OUT/ablation.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcm.config.recipes import EVALUATION, recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plots import line_panels
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.run import Row, evaluate_row
from lcm.maths.solvers import Solver
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, default_model_path
from lcm.training.runs import run_training

T = 1000  # the teacher's training timesteps


def train_and_score(out: Path, k: int, solver: Solver, max_steps: int, steps, prompts, evaluator) -> dict:
    run_dir = out / f"{solver.value}-k{k}"
    changes = {"method.num_solver_steps": T // k, "method.solver": solver.value, "loop.max_steps": max_steps}
    changes |= {"loop.checkpoint_every": max_steps, "loop.log_every": max(max_steps // 50, 1)}
    summary = run_training(recipe_config("before-fidelity", changes), run_dir, resume="auto")
    lcm = LatentDiffusion.from_pretrained(run_dir)
    w = EVALUATION["before-fidelity"]["w"]
    rows = [evaluate_row(lcm, Row(f"LCM {solver.value} k={k}", Sampler.LCM, s, w), prompts, evaluator) for s in steps]
    return {"k": k, "solver": solver.value, "train_wall_seconds": summary["wall_seconds"], "rows": rows}


def report(results: dict, steps: list[int], max_steps: int, out: Path) -> str:
    runs = sorted(results.values(), key=lambda r: (r["solver"], r["k"]))
    header = ["solver", "k", *(f"FD-clf {s}" for s in steps), *(f"acc {s}" for s in steps)]
    table = []
    for r in runs:
        by_steps = {row["steps"]: row for row in r["rows"]}
        fd = [f"{by_steps[s]['fd_clf']:.1f}" for s in steps]
        table.append([r["solver"], r["k"], *fd, *(f"{by_steps[s]['prompt_accuracy']:.3f}" for s in steps)])
    panels = []
    for s in steps:
        series = {}
        for solver in sorted({r["solver"] for r in runs}):
            mine = [r for r in runs if r["solver"] == solver]
            series[solver] = (
                [r["k"] for r in mine],
                [next(x["fd_clf"] for x in r["rows"] if x["steps"] == s) for r in mine],
            )
        panels.append((f"LCM, {s}-step sampling", series))
    line_panels(
        panels,
        out / "ablation.png",
        "skipping step k",
        f"FD-clf ({max_steps} LCD steps)",
        logx=True,
        xticks=sorted({r["k"] for r in runs}),
    )
    return markdown_table(header, table, left=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the results")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="skipping steps k")
    parser.add_argument("--solvers", nargs="+", default=["ddim", "dpm", "dpmpp"], choices=[s.value for s in Solver])
    parser.add_argument("--max-steps", type=int, default=600, help="LCD optimiser steps of every run (the budget)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="LCM sampling steps scored")
    parser.add_argument("--samples", type=int, default=1000, help="images per scored row")
    args = parser.parse_args()
    for k in args.k:
        if not 1 <= k <= T:
            parser.error(f"--k values must lie in [1, {T}], got {k}")
    evaluator = FashionEvaluator(default_model_path() / "classifier")
    prompts = fashion_eval_prompts(args.samples)
    path = args.out / "ablation.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for solver in map(Solver, args.solvers):
        for k in args.k:
            key = f"{solver.value}-k{k}"
            done = results.get(key)
            if (
                done
                and done.get("max_steps") == args.max_steps
                and {r["steps"] for r in done["rows"]} >= set(args.steps)
            ):
                continue
            results[key] = {
                **train_and_score(args.out, k, solver, args.max_steps, args.steps, prompts, evaluator),
                "max_steps": args.max_steps,
                "samples": args.samples,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{key}: " + ", ".join(f"{r['steps']} steps FD-clf {r['fd_clf']:.1f}" for r in results[key]["rows"]))
    table = report(results, args.steps, args.max_steps, args.out)
    (args.out / "ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
