"""LCM, TCD and PCM on equal terms on the embedded benchmark (docs/methods.md): the same data, recipe, budget and
evaluation, two training seeds each.

    python scripts/methods.py --out runs/methods [--methods lcm,tcd,pcm2,pcm4,tcd+adv,...] [--seeds 0,1]
    python scripts/methods.py --out runs/methods --report            # the table of every finished run

Every run is the ``demo-1500`` recipe (lcm.config.recipes: k = 100, w ~ U[1, 5], cosine rate, 1,500 steps of batch
32) with only ``--method`` (and PCM's ``--phases``) changed, and for METHOD+adv the adversarial term at
λ = ADVERSARIAL_WEIGHT (its other settings the defaults); each (method, seed) distils into OUT/METHOD-sSEED and is
sampled with its own sampler (LCM: multistep; TCD: γ = 0.3; PCM: γ = 0, deterministic) at 1, 2, 4 and 8 steps, w = 3
(for METHOD-cfgfree, PCM's CFG-free variant, real classifier-free guidance at w: two network calls per step),
the same prompts and noise in every row, FD-clf and prompt accuracy (the shipped classifier's features against the
10,000 test images; not FID). Rows are ``lcm eval``'s records in OUT/METHOD-sSEED/results.json; finished runs and
rows are kept, so the command resumes. Mean ± half the range over seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lcm.config.recipes import EVALUATION, recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import load_results
from lcm.evaluation.run import Row, evaluate_rows
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import default_model_path
from lcm.training.runs import run_training

# name → dotted overrides of the demo recipe; "+adv" adds the adversarial term at ADVERSARIAL_WEIGHT
BASE = {
    "lcm": {},
    "tcd": {"method.consistency": "tcd"},
    "pcm2": {"method.consistency": "pcm", "method.phases": 2},
    "pcm4": {"method.consistency": "pcm", "method.phases": 4},  # on N = 20 (k = 50): 4 does not divide 10
}
# PCM's CFG-free variant: an unguided teacher, 10% empty captions, no w input; sampled with real guidance at w
CFG_FREE = {f"{name}-cfgfree": {**BASE[name], "method.cfg_free": True} for name in ("pcm2", "pcm4")}
ADVERSARIAL_WEIGHT = 0.1
RECIPE = "demo-1500"  # the budget of every row: 1,500 steps of batch 32
ADVERSARIAL = {f"{name}+adv": {**c, "method.adversarial_weight": ADVERSARIAL_WEIGHT} for name, c in BASE.items()}
METHODS = {**BASE, **ADVERSARIAL, **CFG_FREE}
STEPS = (1, 2, 4, 8)


def changes(method: str, seed: int) -> dict:
    extra = {"method.num_solver_steps": 20} if method.startswith("pcm4") else {}  # 4 phases need N divisible by 4
    return {**METHODS[method], **extra, "loop.seed": seed, "loop.report_to": []}


def run(out: Path, method: str, seed: int, samples: int, prompts, evaluator) -> None:
    folder = out / f"{method}-s{seed}"
    if not (folder / "unet").is_dir():
        run_training(recipe_config(RECIPE, changes(method, seed)), folder, resume="auto")
    model = LatentDiffusion.from_pretrained(folder)
    w = EVALUATION[RECIPE]["w"]
    rows = [Row(method.upper(), model.default_sampler, s, w) for s in STEPS]
    settings = EvalSettings(num_samples=samples)
    evaluate_rows(model, rows, prompts, evaluator, folder / "results.json", settings)


def gamma_rows(out: Path, method: str, seed: int, gammas: list[float], samples: int, prompts, evaluator) -> None:
    """The run's 2/4/8-step rows sampled at other γ (TCD's sampler), in OUT/METHOD-sSEED/results-gamma.json."""
    model = LatentDiffusion.from_pretrained(out / f"{method}-s{seed}")
    w = EVALUATION[RECIPE]["w"]
    rows = [Row(f"{method.upper()} γ {g:g}", model.default_sampler, s, w, gamma=g) for g in gammas for s in STEPS[1:]]
    path = out / f"{method}-s{seed}" / "results-gamma.json"
    evaluate_rows(model, rows, prompts, evaluator, path, EvalSettings(num_samples=samples))


def gamma_report(out: Path) -> str:
    """FD-clf and prompt accuracy of every γ row, mean ± half the range over seeds."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(out.glob("*-s*/results-gamma.json")):
        for r in load_results(path)[1]:
            cells.setdefault((r.method, r.steps), []).append(r.metrics)
    rows = []
    for (name, steps), ms in sorted(cells.items()):
        fd, acc = [m["fd_clf"] for m in ms], [m["prompt_accuracy"] for m in ms]
        spread = (max(fd) - min(fd)) / 2
        rows.append(
            [name, steps, len(ms), f"{statistics.fmean(fd):.1f} ± {spread:.1f}", f"{statistics.fmean(acc):.3f}"]
        )
    return markdown_table(["method", "steps", "seeds", "FD-clf", "prompt accuracy"], rows)


def report(out: Path) -> str:
    runs: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-s*/results.json")):
        records = load_results(path)[1]
        if len(records) == len(STEPS):
            runs.setdefault(path.parent.name.rsplit("-s", 1)[0], []).append({r.steps: r.metrics for r in records})

    def cell(values: list[float], fmt: str) -> str:
        spread = f" ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):{fmt}}{spread}"

    header = ["method", "seeds", *(f"FD-clf {s}" for s in STEPS), *(f"acc {s}" for s in STEPS)]
    rows = []
    for method in (m for m in METHODS if m in runs):
        seeds = runs[method]
        fd = [cell([r[s]["fd_clf"] for r in seeds], ".1f") for s in STEPS]
        acc = [cell([r[s]["prompt_accuracy"] for r in seeds], ".3f") for s in STEPS]
        rows.append([method, len(seeds), *fd, *acc])
    return "Mean ± half the range over training seeds.\n\n" + markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--samples", type=int, default=2000, help="images per row")
    p.add_argument("--report", action="store_true", help="only write OUT/methods.md from finished runs")
    p.add_argument("--gammas", default="", help="comma-separated γ: also sample each run at 2, 4, 8 steps with these")
    a = p.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if not a.report:
        prompts, evaluator = fashion_eval_prompts(a.samples, 0), FashionEvaluator(default_model_path() / "classifier")
        for method in methods:  # both seeds of a method before the next: a row is whole as soon as possible
            for seed in (int(s) for s in a.seeds.split(",")):
                run(a.out, method, seed, a.samples, prompts, evaluator)
                if a.gammas:
                    gammas = [float(g) for g in a.gammas.split(",")]
                    gamma_rows(a.out, method, seed, gammas, a.samples, prompts, evaluator)
    table = report(a.out)
    if any(a.out.glob("*-s*/results-gamma.json")):
        table += "\n\nOther γ (TCD's sampler):\n\n" + gamma_report(a.out)
    (a.out / "methods.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
