"""The skipping-step × ODE-solver ablation of LCD (the paper's Figures 3 and 4) on the embedded teacher.

    python scripts/ablation.py --out runs/ablation [--k 1 5 10 20 50] [--solvers ddim dpm dpmpp] [--max-steps 600]

Every run is the "before-fidelity" recipe (lcm.config.recipes: the demo recipe before docs/fidelity.md changed it,
a constant rate and the w projection at the base rate) at the same budget (optimiser steps, batch, data order, seeds,
w range, learning rate); only the skipping step k (N = 1000 // k solver timesteps) and the solver Ψ differ. Each
LCM is then sampled at 1/2/4 steps with the same prompts and seeds and scored with FD-clf and prompt accuracy (the
shipped classifier's features vs the 10,000 test images; not FID).

Writes OUT/SOLVER-kK/results.json (`lcm eval`'s schema; finished runs and rows are kept, so a rerun resumes; a run
folder holds one budget: use another OUT for another --max-steps), OUT/ablation.md and OUT/ablation.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcm.config.recipes import EVALUATION, recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.plots import line_panels
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import Record
from lcm.evaluation.run import Row, evaluate_rows
from lcm.maths.solvers import Solver
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler
from lcm.shipped import default_model_path
from lcm.training.runs import run_training

T = 1000  # the teacher's training timesteps


def train_and_score(out: Path, k: int, solver: Solver, args, prompts, evaluator) -> list[Record]:
    """Distil the (k, solver) run (kept when finished) and score its LCM into its results.json."""
    run_dir = out / f"{solver.value}-k{k}"
    changes = {"method.num_solver_steps": T // k, "method.solver": solver.value, "loop.max_steps": args.max_steps}
    changes |= {"loop.checkpoint_every": args.max_steps, "loop.log_every": max(args.max_steps // 50, 1)}
    if not (run_dir / "unet").is_dir():
        run_training(recipe_config("before-fidelity", changes), run_dir, resume="auto")
    elif (
        done := json.loads((run_dir / "train" / "run_config.json").read_text())["loop"]["max_steps"]
    ) != args.max_steps:
        raise SystemExit(
            f"{run_dir} was distilled for {done} steps, not --max-steps {args.max_steps}: use another --out"
        )
    lcm = LatentDiffusion.from_pretrained(run_dir)
    w = EVALUATION["before-fidelity"]["w"]
    rows = [Row(f"LCM {solver.value} k={k}", Sampler.LCM, s, w) for s in args.steps]
    settings = EvalSettings(num_samples=args.samples)
    return evaluate_rows(lcm, rows, prompts, evaluator, run_dir / "results.json", settings, k=k, solver=solver.value)


def report(runs: dict[tuple[str, int], list[Record]], steps: list[int], max_steps: int, out: Path) -> str:
    header = ["solver", "k", *(f"FD-clf {s}" for s in steps), *(f"acc {s}" for s in steps)]
    table = []
    for (solver, k), records in sorted(runs.items()):
        fd = [f"{r.metrics['fd_clf']:.1f}" for r in records]
        table.append([solver, k, *fd, *(f"{r.metrics['prompt_accuracy']:.3f}" for r in records)])
    panels = []
    for i, s in enumerate(steps):
        series = {}
        for solver in sorted({solver for solver, _ in runs}):
            mine = sorted((k, records[i].metrics["fd_clf"]) for (name, k), records in runs.items() if name == solver)
            series[solver] = ([k for k, _ in mine], [fd for _, fd in mine])
        panels.append((f"LCM, {s}-step sampling", series))
    line_panels(
        panels,
        out / "ablation.png",
        "skipping step k",
        f"FD-clf ({max_steps} LCD steps)",
        logx=True,
        xticks=sorted({k for _, k in runs}),
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
    runs = {}
    for solver in map(Solver, args.solvers):
        for k in args.k:
            runs[solver.value, k] = train_and_score(args.out, k, solver, args, prompts, evaluator)
    table = report(runs, args.steps, args.max_steps, args.out)
    (args.out / "ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
