"""LCM, TCD and PCM on equal terms on the embedded benchmark (docs/methods.md): the same data, recipe, budget and
evaluation, two training seeds each.

    python scripts/methods.py --out runs/methods [--methods lcm,tcd,pcm2,pcm4,tcd+adv,...] [--seeds 0,1]
    python scripts/methods.py --out runs/methods --report --docs docs/eval   # docs/eval/methods.md and .png
    python scripts/methods.py --out runs/demo --recipe demo --methods lcm,tcd+adv1   # docs/eval/methods_demo.md

Every run is the ``demo-1500`` recipe (lcm.config.recipes: k = 100, w ~ U[1, 5], cosine rate, 1,500 steps of batch
32; ``--recipe demo`` for lcm demo's 750, ``--recipe long`` for 10,000) with only ``--method`` (and PCM's
``--phases``) changed, and for METHOD+adv the adversarial term at λ = ADVERSARIAL_WEIGHT (its other settings the
defaults; METHOD+adv1 judging the 1-step sample), for METHOD+dmd the distribution-matching term at λ = DMD_WEIGHT;
A>B is a second stage, B's settings for 300 (or 1,000) steps on run A's model (SECOND). Each (method, seed) distils into
OUT/METHOD-sSEED and is sampled with its own sampler (LCM: multistep; TCD: γ = 0.3;
PCM: γ = 0, deterministic) at 1, 2, 4 and 8 steps, w = 3
(for METHOD-cfgfree, PCM's CFG-free variant, real classifier-free guidance at w: two network calls per step),
the same prompts and noise in every row, FD-clf and prompt accuracy (the shipped classifier's features against the
10,000 test images; not FID). Rows are ``lcm eval``'s records in OUT/METHOD-sSEED/results.json; the teacher's
reference row (DPM-Solver, 25 steps, the same prompts and noise) is OUT/teacher/results.json. Finished runs and
rows are kept, so the command resumes. Mean ± half the range over seeds. The report (OUT/methods.md, or with
``--docs DIR`` DIR/methods.md) is the whole document, with its plot (methods.png) beside it. With ``--docs``, every
run's rows (its results*.json, no weights) are also kept in DIR/records/NAME/METHOD-sSEED/ and the report is made
from there: the rows outlive the run folders, and ``--report --docs DIR`` regenerates it from the repository alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from lcm.config.recipes import EVALUATION, recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.plots import line_panels
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import load_results
from lcm.evaluation.run import Row, evaluate_rows
from lcm.maths.timesteps import Sampler
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.shipped import default_model_path, default_sampling_path
from lcm.training.regression import load_pairs
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
RECIPES = ("demo-1500", "demo", "long")  # the budgets: 1,500, 750 (lcm demo's) or 10,000 steps of batch 32
TEACHER_ROW = ("teacher DPM-Solver", Sampler.DPM_SOLVER_2M, 25)  # the teacher's best row (docs/eval/table.md)
ADVERSARIAL = {f"{name}+adv": {**c, "method.adversarial_weight": ADVERSARIAL_WEIGHT} for name, c in BASE.items()}
# "+adv1": the discriminator judges the student's 1-step sample from pure noise instead of its pair prediction
ONE_STEP = {f"{name}1": {**c, "method.adversarial_input": "one-step"} for name, c in ADVERSARIAL.items()}
# "+dmd": the distribution-matching term (DMD2's gradient on the 1-step sample) at DMD_WEIGHT instead
DMD_WEIGHT = 1.0
DMD = {f"{name}+dmd": {**c, "method.dmd_weight": DMD_WEIGHT} for name, c in BASE.items()}
# "A>B": a second stage of SECOND_STAGE_STEPS steps (1,000 for "-1k") with B's settings, its full student (and the
# fake score) started from run A of the same seed (--init-student), as Hyper-SD and DMD2 train a 1-step generator on
# a trained model; "A>A" continues A itself as long, the control. SHIPPED as A: the shipped LCM (lcm demo --recipe
# long, 10,000 steps)
SECOND_STAGE_STEPS = 300
# the regression term's pairs: `lcm pairs --out OUT/pairs.safetensors --count 12000 --w-min 1 --w-max 5` (the
# shipped teacher, DPM-Solver 25 steps, w ~ U[1, 5], noise seeds 7,000,000 + i)
PAIRS_FILE = "pairs.safetensors"
STAGE = {"method.dmd_weight": DMD_WEIGHT, "method.dmd_fake_updates": 5}  # DMD2's two time-scale rule
SHIPPED = "shipped"
SECOND = {
    "tcd+adv1>dmd5": ("tcd+adv1", {**BASE["tcd"], **STAGE}),
    "tcd+adv1>tcd+adv1": ("tcd+adv1", ONE_STEP["tcd+adv1"]),
    "tcd+adv1>dmd5+adv1": ("tcd+adv1", {**ONE_STEP["tcd+adv1"], **STAGE}),
    "shipped>lcm+dmd5": (SHIPPED, STAGE),
    "shipped>lcm": (SHIPPED, BASE["lcm"]),
    "shipped>lcm+dmd5-1k": (SHIPPED, {**STAGE, "loop.max_steps": 1000}),
    "shipped>lcm-1k": (SHIPPED, {"loop.max_steps": 1000}),
    "shipped>lcm-3k": (SHIPPED, {"loop.max_steps": 3000}),  # the control of the regression term's 3,000-step stage
    # the regression term (λ = 1) on OUT/PAIRS_FILE, 3,000 steps
    "shipped>lcm+reg1-3k": (SHIPPED, {"method.regression_weight": 1.0, "loop.max_steps": 3000}),
    "shipped>lcm+dmd5+adv1": (SHIPPED, {**STAGE, **ONE_STEP["lcm+adv1"]}),  # DMD2's pair of terms
    # the same with the adversarial term at 3x its weight
    "shipped>lcm+dmd5+adv1x3": (SHIPPED, {**STAGE, **ONE_STEP["lcm+adv1"], "method.adversarial_weight": 0.3}),
    # ... or with the student's rate at a quarter of the recipe's 2e-4
    "shipped>lcm+dmd5+adv1-lr5e-5": (SHIPPED, {**STAGE, **ONE_STEP["lcm+adv1"], "optim.learning_rate": 5e-5}),
}
# ... and with the discriminator's levels capped lower than the default t' ≤ 500 (LADD: low levels judge detail)
SECOND |= {
    f"shipped>lcm+dmd5+adv1-lr5e-5-t{t}": (
        SHIPPED,
        {**SECOND["shipped>lcm+dmd5+adv1-lr5e-5"][1], "method.adversarial_max_t": float(t)},
    )
    for t in (50, 100)
}
# ... or with the discriminator's rate at 10x its default 1e-4: in 300 steps at 1e-4 its hinge loss stays near chance
SECOND["shipped>lcm+dmd5+adv1-lr5e-5-dlr1e-3"] = (
    SHIPPED,
    {**SECOND["shipped>lcm+dmd5+adv1-lr5e-5"][1], "method.adversarial_lr": 1e-3},
)
# the regression term at λ = 1, 2 or 4, alone or with the 1-step-judging adversarial term beside it (DMD2's term with
# DMD's regression), over 3,000 or 6,000 steps: "shipped>lcm+reg2+adv1-6k"
SECOND |= {
    f"shipped>lcm+reg{lam}{'+adv1' * adv}-{k}k": (
        SHIPPED,
        {
            **(ONE_STEP["lcm+adv1"] if adv else {}),
            "method.regression_weight": float(lam),
            "loop.max_steps": k * 1000,
        },
    )
    for lam in (1, 2, 4)
    for adv in (False, True)
    for k in (3, 6)
    if (lam, adv, k) != (1, False, 3)  # defined above
}
# third stages on the λ = 4 regression stage: the adversarial term added once the regression has run its 6,000 steps
# (so its discriminator judges samples the regression has already brought close), 1,000 steps beside the same
# regression, its discriminator's rate 1e-3 (at 1e-4 its hinge loss stays near chance over 300 steps), and the control:
# the regression alone for as long
SECOND |= {
    f"shipped>lcm+reg4-6k>lcm+reg4{'+adv1-dlr1e-3' * adv}-1k": (
        "shipped>lcm+reg4-6k",
        {
            **({**ONE_STEP["lcm+adv1"], "method.adversarial_lr": 1e-3} if adv else {}),
            "method.regression_weight": 4.0,
            "loop.max_steps": 1000,
        },
    )
    for adv in (False, True)
}
METHODS = {**BASE, **ADVERSARIAL, **ONE_STEP, **DMD, **CFG_FREE, **{name: c for name, (_, c) in SECOND.items()}}
STEPS = (1, 2, 4, 8)
W = EVALUATION["demo-1500"]["w"]  # the w of every row


def changes(method: str, seed: int, out: Path | None = None) -> dict:
    extra = {"method.num_solver_steps": 20} if method.startswith("pcm4") else {}  # 4 phases need N divisible by 4
    if method in SECOND:  # the first stage's run of this seed, then the second's own (shorter) schedule
        base = SECOND[method][0]
        first = default_sampling_path() if base == SHIPPED else Path(out) / f"{base}-s{seed}"
        if not (first / "unet").is_dir():
            raise SystemExit(f"{method} starts from {first}: make it first (--methods {SECOND[method][0]})")
        steps = METHODS[method].get("loop.max_steps", SECOND_STAGE_STEPS)
        extra |= {"method.init_student": str(first), "loop.max_steps": steps, "optim.lr_warmup_steps": steps // 10}
    if METHODS[method].get("method.regression_weight"):
        pairs = Path(out) / PAIRS_FILE
        if not pairs.is_file():
            raise SystemExit(
                f"{method} regresses onto {pairs}: make it first "
                f"(lcm pairs --out {pairs} --count 12000 --w-min 1 --w-max 5)"
            )
        extra["method.regression_pairs"] = str(pairs)
    return {**METHODS[method], **extra, "loop.seed": seed, "loop.report_to": []}


def results_name(kind: str, eval_seed: int) -> str:
    """``kind``.json for the evaluation seed 0 (the table's), ``kind``-seedN.json for another (``--eval-seed``)."""
    return f"{kind}.json" if eval_seed == 0 else f"{kind}-seed{eval_seed}.json"


def run(out: Path, recipe: str, method: str, seed: int, samples: int, prompts, evaluator, eval_seed: int) -> None:
    folder = out / f"{method}-s{seed}"
    if not (folder / "unet").is_dir():
        run_training(recipe_config(recipe, changes(method, seed, out)), folder, resume="auto")
    model = LatentDiffusion.from_pretrained(folder)
    rows = [Row(method.upper(), model.default_sampler, s, W) for s in STEPS]
    settings = EvalSettings(num_samples=samples, seed=eval_seed)
    evaluate_rows(model, rows, prompts, evaluator, folder / results_name("results", eval_seed), settings)


def teacher_row(out: Path, samples: int, prompts, evaluator, eval_seed: int) -> None:
    """The teacher's best row on the same prompts and noise, the table's reference: OUT/teacher/results.json."""
    model = LatentDiffusion.from_pretrained(default_model_path())
    name, sampler, steps = TEACHER_ROW
    settings = EvalSettings(num_samples=samples, seed=eval_seed)
    path = out / "teacher" / results_name("results", eval_seed)
    evaluate_rows(model, [Row(name, sampler, steps, W)], prompts, evaluator, path, settings)


def gamma_rows(
    out: Path, method: str, seed: int, gammas: list[float], samples: int, prompts, evaluator, eval_seed: int
) -> None:
    """The run's 2/4/8-step rows sampled at other γ (TCD's sampler), in OUT/METHOD-sSEED/results-gamma.json."""
    model = LatentDiffusion.from_pretrained(out / f"{method}-s{seed}")
    rows = [Row(f"{method.upper()} γ {g:g}", model.default_sampler, s, W, gamma=g) for g in gammas for s in STEPS[1:]]
    path = out / f"{method}-s{seed}" / results_name("results-gamma", eval_seed)
    evaluate_rows(model, rows, prompts, evaluator, path, EvalSettings(num_samples=samples, seed=eval_seed))


def gamma_report(out: Path, eval_seed: int = 0) -> str:
    """FD-clf and prompt accuracy of every γ row, mean ± half the range over seeds."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(out.glob(f"*-s*/{results_name('results-gamma', eval_seed)}")):
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


def finished_runs(out: Path, eval_seed: int = 0) -> dict[str, list[dict[int, dict]]]:
    """Method → one {steps: metrics} per training seed, for every run in OUT with all its rows."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(out.glob(f"*-s*/{results_name('results', eval_seed)}")):
        records = load_results(path)[1]
        if len(records) == len(STEPS):
            runs.setdefault(path.parent.name.rsplit("-s", 1)[0], []).append({r.steps: r.metrics for r in records})
    return {m: runs[m] for m in METHODS if m in runs}


def teacher_best(out: Path, eval_seed: int = 0) -> float | None:
    path = out / "teacher" / results_name("results", eval_seed)
    return load_results(path)[1][0].metrics["fd_clf"] if path.is_file() else None


def keep_records(out: Path, records: Path) -> Path:
    """Copy every run's (and the teacher's) results*.json from OUT into RECORDS, the same layout without the weights;
    a file with fewer rows than the kept one (a run still being evaluated) does not replace it. Returns RECORDS."""
    for path in sorted(out.glob("*/results*.json")):
        target = records / path.parent.name / path.name
        if target.is_file() and len(load_results(target)[1]) > len(load_results(path)[1]):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return records


def report(out: Path, eval_seed: int = 0) -> str:
    def cell(values: list[float], fmt: str) -> str:
        spread = f" ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):{fmt}}{spread}"

    header = ["method", "seeds", *(f"FD-clf {s}" for s in STEPS), *(f"acc {s}" for s in STEPS)]
    rows = []
    for method, seeds in finished_runs(out, eval_seed).items():
        fd = [cell([r[s]["fd_clf"] for r in seeds], ".1f") for s in STEPS]
        acc = [cell([r[s]["prompt_accuracy"] for r in seeds], ".3f") for s in STEPS]
        rows.append([method, len(seeds), *fd, *acc])
    return "Mean ± half the range over training seeds.\n\n" + markdown_table(header, rows)


def plot(out: Path, path: Path, eval_seed: int = 0) -> Path:
    """FD-clf against steps, one panel per family (guided, + a term, CFG-free, second stages), the mean over seeds with
    the teacher's best row as a flat line."""
    runs, best = finished_runs(out, eval_seed), teacher_best(out, eval_seed)
    families = [
        ("guided", [m for m in BASE if m in runs]),
        ("+ adversarial term", [m for m in {**ADVERSARIAL, **ONE_STEP} if m in runs]),
        ("+ distribution matching", [m for m in DMD if m in runs]),
        ("CFG-free (guided at sampling)", [m for m in CFG_FREE if m in runs]),
        ("second stage", [m for m in SECOND if m in runs]),
    ]
    panels = []
    for title, methods in (f for f in families if f[1]):
        series = {m: (list(STEPS), [statistics.fmean(r[s]["fd_clf"] for r in runs[m]) for s in STEPS]) for m in methods}
        if best is not None:
            series[f"teacher, {TEACHER_ROW[2]} steps"] = ([STEPS[0], STEPS[-1]], [best, best])
        panels.append((title, series))
    return line_panels(panels, path, "steps", f"FD-clf ↓ (w = {W:g})", logx=True, logy=True, xticks=STEPS)


def document(out: Path, recipe: str, plot_name: str, eval_seed: int = 0, pairs: Path | None = None) -> str:
    """The whole report from the rows in OUT (the run folders or their kept records; PAIRS: the regression term's
    pairs, default OUT/PAIRS_FILE): what was run, the table, the γ rows, the plot."""
    pairs = pairs or out / PAIRS_FILE
    steps = recipe_config(recipe).loop.max_steps
    best = teacher_best(out, eval_seed)
    results = sorted(out.glob(f"*-s*/{results_name('results', eval_seed)}"))
    images = next((load_results(p)[1][0].n_samples for p in results), 0)
    reference = (
        f"The teacher's best row on the same prompts and noise ({TEACHER_ROW[0]}, {TEACHER_ROW[2]} steps, "
        f"OUT/teacher): **{best:.1f}**."
        if best is not None
        else "The teacher's reference row is not evaluated yet."
    )
    lines = [
        f"# LCM, TCD and PCM on equal terms, with and without the adversarial term ({steps:,}-step budget)",
        "",
        f"Made by `python scripts/methods.py --out OUT --recipe {recipe}` (the rows below; the `seeds` column "
        f"counts each row's training seeds), then `--report --docs docs/eval`. Every run is the `{recipe}` recipe "
        f"(lcm.config.recipes: k = 100, w ~ U[1, 5], cosine rate, {steps:,} steps of batch 32, full student) "
        "with only `--method` (and `--phases`) changed; "
        f"`+adv` adds the adversarial term at λ = {ADVERSARIAL_WEIGHT:g} (its other settings "
        "the defaults: the discriminator's rate 1e-4, levels up to t' = 500), judging the student's prediction for "
        "the pair; `+adv1` the same term judging the student's 1-step sample from pure noise instead "
        f"(`--adversarial-input one-step`); `+dmd` adds the distribution-matching term at λ = {DMD_WEIGHT:g} instead "
        "(DMD2's gradient on the 1-step sample, `--dmd-weight`, the fake score's rate the default 4e-4); "
        "`-cfgfree` is PCM's CFG-free variant "
        f"(an unguided teacher, 10% empty captions, no w input; sampled with real guidance at w = {W:g}, two network "
        "calls per step). PCM with 4 phases trains on N = 20 (k = 50): 4 does not divide 10. Each method samples with "
        "its own sampler (LCM: multistep; TCD: γ = 0.3; PCM: γ = 0, deterministic, the phase edges at M steps), "
        f"every row {images:,} images at w = {W:g} with `lcm eval`'s prompts and noise (seed {eval_seed}). "
        "FD-clf and prompt accuracy are in the shipped classifier's features against the 10,000 test images "
        "(not FID); the VAE's own reconstructions of test images score 57.1. " + reference,
        "",
        report(out, eval_seed),
        f"![FD-clf against steps]({plot_name})",
    ]
    if any(path.parent.name.rsplit("-s", 1)[0] in SECOND for path in results):
        lines += [
            "",
            f"`A>B` rows are second stages: run A's model (the same training seed; `shipped`: the shipped LCM, made "
            f"by `lcm demo --recipe long`) trained {SECOND_STAGE_STEPS} more steps (`-1k`, `-3k`, `-6k`: 1,000, 3,000, "
            "6,000) with B's settings "
            "(`--init-student`; a new optimiser, a warm-up of a tenth of the steps and the recipe's rate "
            f"schedule); `dmd5` is the distribution-matching term at λ = {DMD_WEIGHT:g} with five fake-score updates "
            "per step (`--dmd-fake-updates 5`), `A>A` the control: A's own settings for as long; `adv1x3` the "
            "1-step-judging adversarial term at 3x its λ, `-lr5e-5` the student's rate 5e-5 instead of the recipe's, "
            "`-dlr1e-3` the discriminator's rate 1e-3 instead of 1e-4; `A>B>C` a third stage on the second stage "
            "A>B's run.",
        ]
    if pairs.is_file() and any("+reg" in path.parent.name for path in results):
        count = len(load_pairs(pairs))
        lines[-1] += (
            f" `+regλ` adds the regression term at λ (`--regression-weight`) over the {count:,} pairs of "
            f"OUT/{PAIRS_FILE} (`lcm pairs --count {count} --w-min 1 --w-max 5`: the shipped teacher's DPM-Solver "
            "25-step samples at w ~ U[1, 5])."
        )
    if any(out.glob(f"*-s*/{results_name('results-gamma', eval_seed)}")):
        table = gamma_report(out, eval_seed)
        lines += ["", "TCD's sampler at other γ (`--gammas`; same prompts and noise):", "", table]
    lines += ["", "docs/methods.md discusses the rows, the w sweep and the evaluation-seed-1 rows."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="runs folder: OUT/METHOD-sSEED, OUT/teacher")
    p.add_argument("--recipe", choices=RECIPES, default=RECIPES[0], help="training budget (default %(default)s)")
    p.add_argument("--docs", type=Path, help="write the report and its plot here instead of OUT")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--samples", type=int, default=2000, help="images per row")
    p.add_argument("--report", action="store_true", help="only write the report from finished runs")
    p.add_argument(
        "--eval-seed", type=int, default=0, help="evaluation seed (prompts and noise; default 0, the table's)"
    )
    p.add_argument("--name", help="the report's file stem (default methods, or methods_RECIPE for other recipes)")
    p.add_argument("--gammas", default="", help="comma-separated γ: also sample each run at 2, 4, 8 steps with these")
    a = p.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if not a.report:
        prompts = fashion_eval_prompts(a.samples, a.eval_seed)
        evaluator = FashionEvaluator(default_model_path() / "classifier")
        teacher_row(a.out, a.samples, prompts, evaluator, a.eval_seed)
        for method in methods:  # both seeds of a method before the next: a row is whole as soon as possible
            for seed in (int(s) for s in a.seeds.split(",")):
                run(a.out, a.recipe, method, seed, a.samples, prompts, evaluator, a.eval_seed)
                if a.gammas:
                    gammas = [float(g) for g in a.gammas.split(",")]
                    gamma_rows(a.out, method, seed, gammas, a.samples, prompts, evaluator, a.eval_seed)
    docs, name = a.docs or a.out, a.name or ("methods" if a.recipe == RECIPES[0] else f"methods_{a.recipe}")
    rows = keep_records(a.out, a.docs / "records" / name) if a.docs else a.out
    plot(rows, docs / f"{name}.png", a.eval_seed)
    text = document(rows, a.recipe, f"{name}.png", a.eval_seed, pairs=a.out / PAIRS_FILE)
    (docs / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
