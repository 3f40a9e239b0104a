"""``lcm demo``: distil the shipped Fashion-MNIST teacher on the CPU, then compare it with its teacher.

Writes, under ``--out``: the LCM (a diffusers folder), ``demo_grid.png`` (rows: teacher DDIM at 1/2/4/8 steps, then
the LCM at 1/2/4/8; columns: the ten class prompts, one seed each) and ``results.md`` / ``results.json`` (FD-clf,
KID-clf, prompt accuracy, seconds per image per row).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lcm.data.captions import class_prompts
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.run import Row, evaluate_row
from lcm.images import save_labelled_grid
from lcm.maths.solvers import Solver
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, default_model_path, generate
from lcm.training.lcd import LCDConfig
from lcm.training.loop import TrainConfig
from lcm.training.runs import DataConfig, run_distillation

__all__ = ["DemoConfig", "run_demo"]

# The teacher's DDIM rows start at t = T - 1 ("trailing"), as lcm eval's: with the shipped scheduler config's
# "leading" spacing a 1-step DDIM would start at t = 1 and return noise, which is no baseline.
TEACHER_SPACING = "trailing"


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("lcm-demo")
    max_steps: int = 1500  # LCD optimiser steps
    batch_size: int = 32
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine_floor"  # down to 10% over the run: better 2-4 step images (docs/fidelity.md)
    lr_warmup_steps: int = 100
    num_solver_steps: int = 10  # N of the skipping grid: k = 1000 // N = 100 (docs/fidelity.md)
    w_lr_scale: float = 10.0  # learning-rate multiplier of the w projection (docs/fidelity.md)
    solver: Solver = Solver.DDIM
    w_min: float = 1.0  # guidance range of distillation (the paper's w)
    w_max: float = 5.0
    w_eval: float = 3.0  # guidance of every evaluated row, teacher and LCM alike
    ema_decay: float = 0.95
    eval_samples: int = 1000  # images per row
    seed: int = 0
    data_dir: Path | None = None
    teacher: Path | None = None  # default: the shipped teacher (a retrained one: lcm train-teacher's output)
    compile: str = "off"  # torch.compile the distillation's networks (lcm.models.fast.Compile): on pays off only
    # once $LCM_CACHE/inductor holds the graphs (README, Performance)

    recipe: str = "demo"

    @classmethod
    def quick(cls, out: Path) -> DemoConfig:
        """A minute-long run that exercises every stage (for CI): numbers are not meaningful."""
        return cls(out=out, max_steps=20, eval_samples=100, recipe="quick")

    @classmethod
    def for_recipe(cls, recipe: str, out: Path) -> DemoConfig:
        """The settings of a named recipe (docs/fidelity.md): ``demo`` (the default, about 10 minutes on 2 CPU
        cores end to end) or ``long`` (10,000 compiled steps, under an hour; the README's second table)."""
        if recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        return cls(out=out, recipe=recipe, **RECIPES[recipe])


# Recipes of lcm demo: overrides of DemoConfig's defaults (docs/fidelity.md says why each value).
RECIPES: dict[str, dict] = {
    "demo": {},
    # compiled: 1.3-1.4x the eager steps/s, so 10,000 steps fit the hour on 2 cores (the first ~3 minutes compile)
    "long": {"max_steps": 10000, "eval_samples": 2000, "compile": "on"},
}


def _table(rows: list[dict]) -> str:
    lines = [
        "| method | steps | NFE/image | FD-clf ↓ | KID-clf ↓ | prompt accuracy ↑ | s/image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['nfe_per_image']} | {r['fd_clf']:.1f} | {r['kid_clf']:.4f} | "
            f"{r['prompt_accuracy']:.3f} | {r['seconds_per_image'] * 1000:.1f} ms |"
        )
    return "\n".join(lines) + "\n"


def _forget_other_runs(lcm_dir: Path, cfg: DemoConfig) -> None:
    """Resume an interrupted demo, but never continue one that was started with other settings: the demo's own
    LCM folder is started afresh then (saying so)."""
    stamp = cfg.out / "demo_config.json"
    config = json.dumps({k: str(v) for k, v in asdict(cfg).items()}, sort_keys=True)
    if lcm_dir.exists() and stamp.is_file() and stamp.read_text() != config:
        print(f"{lcm_dir} holds a demo run with other settings: starting it afresh")
        shutil.rmtree(lcm_dir)
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(config)


def run_demo(cfg: DemoConfig) -> dict:
    teacher_path = cfg.teacher or default_model_path()
    lcm_dir = cfg.out / "lcm"
    _forget_other_runs(lcm_dir, cfg)
    summary = run_distillation(
        teacher_path,
        DataConfig(batch_size=cfg.batch_size, data_dir=cfg.data_dir),
        LCDConfig(
            num_solver_steps=cfg.num_solver_steps,
            solver=cfg.solver,
            w_min=cfg.w_min,
            w_max=cfg.w_max,
            ema_decay=cfg.ema_decay,
            w_lr_scale=cfg.w_lr_scale,
        ),
        TrainConfig(
            out=lcm_dir,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            lr_schedule=cfg.lr_schedule,
            lr_warmup_steps=cfg.lr_warmup_steps,
            seed=cfg.seed,
            checkpoint_every=max(cfg.max_steps // 3, 1),
            validate_every=0,
            log_every=max(cfg.max_steps // 100, 1),
            resume="auto",
            compile=cfg.compile,
        ),
        validation_prompts=tuple(class_prompts()),
        validation_w=cfg.w_eval,
    )

    teacher, lcm = LatentDiffusion.from_pretrained(teacher_path), LatentDiffusion.from_pretrained(lcm_dir)
    evaluator = FashionEvaluator(teacher_path / "classifier", cfg.data_dir)
    prompts = fashion_eval_prompts(cfg.eval_samples, cfg.seed)
    rows, grid = [], []
    grid_prompts, grid_seeds = class_prompts(), list(range(10))
    runs = ((teacher, "teacher DDIM", Sampler.DDIM, TEACHER_SPACING), (lcm, "LCM", Sampler.LCM, None))
    for model, method, sampler, spacing in runs:
        for steps in (1, 2, 4, 8):
            row = Row(method, sampler, steps, cfg.w_eval, spacing)
            rows.append(evaluate_row(model, row, prompts, evaluator))
            grid.append(generate(model, grid_prompts, sampler, steps, cfg.w_eval, grid_seeds, timestep_spacing=spacing))
            r = rows[-1]
            print(f"{method} {steps} steps: FD-clf {r['fd_clf']:.1f}, prompt accuracy {r['prompt_accuracy']:.3f}")
    row_labels = [f"{r['method']} {r['steps']} step{'' if r['steps'] == 1 else 's'}" for r in rows]
    grid_path = save_labelled_grid(torch.cat(grid), cfg.out / "demo_grid.png", row_labels, grid_prompts, scale=2)
    table = _table(rows)
    header = (
        f"# lcm demo\n\nLCD of the shipped Fashion-MNIST teacher, recipe {cfg.recipe}: {summary['steps']} steps, "
        f"batch {cfg.batch_size}, {cfg.solver.value} solver, k = {1000 // cfg.num_solver_steps}, "
        f"w ~ U[{cfg.w_min}, {cfg.w_max}], learning rate {cfg.learning_rate:g} ({cfg.lr_schedule}; "
        f"{cfg.w_lr_scale:g}x on the w projection), "
        f"{summary['wall_seconds']:.0f} s of training. "
        f"Teacher DDIM with {TEACHER_SPACING} timesteps. "
        f"Every row: {cfg.eval_samples} images, guidance w = {cfg.w_eval}, the same prompts and seeds. FD-clf and "
        "KID-clf are computed in the shipped classifier's features against the 10,000 test images (not FID).\n\n"
        "Grid rows: teacher DDIM 1, 2, 4, 8 steps; LCM 1, 2, 4, 8 steps.\n\n"
    )
    (cfg.out / "results.md").write_text(header + table)
    config = {k: str(v) if isinstance(v, Path | Solver) or v is None else v for k, v in asdict(cfg).items()}
    results = {"config": config, "train_wall_seconds": summary["wall_seconds"], "rows": rows}
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table)
    print(f"grid: {grid_path}\ntable: {cfg.out / 'results.md'}\nmodel: {lcm_dir}")
    return results


def demo_config_from(out: Path, quick: bool, recipe: str = "demo", **overrides) -> DemoConfig:
    base = DemoConfig.quick(out) if quick else DemoConfig.for_recipe(recipe, out)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
