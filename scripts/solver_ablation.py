"""LCD with each ODE solver at an equal training budget on the embedded teacher; LCM FD-clf at 1/2/4/8 steps.

    python scripts/solver_ablation.py --out runs/solvers [--max-steps 600] [--solvers ddim dpm dpmpp]

Each run is a `lcm demo`-style distillation (same data order, seeds, w range and learning rate); only the solver
differs. Writes OUT/solver_ablation.json and prints a Markdown table. Resumes finished runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lcm.demo import DemoConfig
from lcm.distill import LCDConfig
from lcm.evaluate import Row, evaluate_row, fashion_eval_prompts
from lcm.generate import Sampler, default_model_path
from lcm.metrics import FashionEvaluator
from lcm.run_distill import DataConfig, run_distillation
from lcm.solvers import Solver
from lcm.teacher import LatentDiffusion
from lcm.trainer import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--solvers", nargs="+", default=["ddim", "dpm", "dpmpp"])
    parser.add_argument("--samples", type=int, default=1000, help="images per evaluated row")
    args = parser.parse_args()
    base = replace(DemoConfig(), max_steps=args.max_steps)
    teacher = default_model_path()
    evaluator = FashionEvaluator(teacher / "classifier")
    prompts = fashion_eval_prompts(args.samples)
    out = Path(args.out)
    results_path = out / "solver_ablation.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.solvers:
        if name in results:
            continue
        run_dir = out / name
        summary = run_distillation(
            teacher,
            DataConfig(batch_size=base.batch_size),
            LCDConfig(solver=Solver(name), w_min=base.w_min, w_max=base.w_max, ema_decay=base.ema_decay),
            TrainConfig(
                out=run_dir,
                max_steps=base.max_steps,
                learning_rate=base.learning_rate,
                seed=base.seed,
                validate_every=0,
                checkpoint_every=base.max_steps,
                resume="latest",
                log_every=max(base.max_steps // 50, 1),
            ),
        )
        lcm = LatentDiffusion.from_pretrained(run_dir)
        rows = [
            evaluate_row(lcm, Row(f"LCM ({name})", Sampler.LCM, s, base.w_eval), prompts, evaluator)
            for s in (1, 2, 4, 8)
        ]
        results[name] = {"train_wall_seconds": summary["wall_seconds"], "rows": rows}
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| solver | train s | FD-clf 1 | 2 | 4 | 8 | acc 1 | 2 | 4 | 8 |  ({args.max_steps} steps)")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        fd = " | ".join(f"{x['fd_clf']:.1f}" for x in r["rows"])
        acc = " | ".join(f"{x['prompt_accuracy']:.3f}" for x in r["rows"])
        print(f"| {name} | {r['train_wall_seconds']:.0f} | {fd} | {acc} |")


if __name__ == "__main__":
    main()
