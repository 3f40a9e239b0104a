"""``lcm demo``: distil the shipped Fashion-MNIST teacher on the CPU, then compare it with its teacher.

Writes, under ``--out``: the LCM (a diffusers folder), ``demo_grid.png`` (rows: teacher DDIM at 1/2/4/8 steps, then
the LCM at 1/2/4/8; columns: the ten class prompts, one seed each; a flow teacher samples with Euler, the flow's
DDIM) and ``results.md`` / ``results.json`` (FD-clf,
KID-clf, prompt accuracy, seconds per image per row).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lcm.config.recipes import EVALUATION, FLOW, recipe_config
from lcm.config.run import RunConfig
from lcm.data.captions import class_prompts
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import brief, markdown_table
from lcm.evaluation.results import Record, save_results
from lcm.evaluation.run import Row, evaluate_row
from lcm.images import save_labelled_grid
from lcm.maths.timesteps import DEFAULT_SPACING
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, generate
from lcm.shipped import default_model_path, embedded_classifier
from lcm.training.runs import run_training

__all__ = ["DemoConfig", "demo_config", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """A demo: a recipe's run-config tree (:mod:`lcm.config.recipes`), where it goes and how it is evaluated."""

    out: Path = Path("lcm-demo")
    recipe: str = "demo"
    run: RunConfig = field(default_factory=lambda: recipe_config("demo"))
    eval_samples: int = EVALUATION["demo"]["samples"]  # images per table row
    w_eval: float = EVALUATION["demo"]["w"]  # guidance of every evaluated row, teacher and LCM alike


def demo_config(
    out: Path,
    recipe: str = "demo",
    changes: dict | None = None,
    eval_samples: int | None = None,
    teacher: str | Path | None = None,
):
    """The demo of ``recipe`` with dotted ``changes`` to its tree (``{"loop.max_steps": 100}``), distilling
    ``teacher`` (default: the shipped one); a flow-matching teacher takes :data:`lcm.config.recipes.FLOW` too."""
    evaluation = EVALUATION[recipe] if recipe in EVALUATION else {}
    flow = teacher is not None and (Path(teacher) / "transformer").is_dir()
    teacher_change = {"model": str(teacher)} if teacher is not None else {}
    return DemoConfig(
        out=Path(out),
        recipe=recipe,
        run=recipe_config(recipe, {**(FLOW if flow else {}), **teacher_change, **(changes or {})}),
        eval_samples=eval_samples or evaluation["samples"],
        w_eval=evaluation["w"],
    )


def _table(rows: list[Record]) -> str:
    header = ["method", "steps", "NFE/image", "FD-clf ↓", "KID-clf ↓", "prompt accuracy ↑", "s/image"]
    cells = [
        [r.method, r.steps, r.nfe_per_image, f"{r.metrics['fd_clf']:.1f}", f"{r.metrics['kid_clf']:.4f}",
         f"{r.metrics['prompt_accuracy']:.3f}", f"{r.seconds_per_image * 1000:.1f} ms"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


def _forget_other_runs(lcm_dir: Path, cfg: DemoConfig) -> None:
    """Resume an interrupted demo, but never continue one that was started with other settings: the demo's own
    LCM folder is started afresh then (saying so)."""
    stamp = cfg.out / "demo_config.json"
    config = json.dumps({"recipe": cfg.recipe, "run": cfg.run.to_dict()}, sort_keys=True)
    if lcm_dir.exists() and stamp.is_file() and stamp.read_text() != config:
        print(f"{lcm_dir} holds a demo run with other settings: starting it afresh")
        shutil.rmtree(lcm_dir)
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(config)


def run_demo(cfg: DemoConfig) -> dict:
    teacher_path = Path(cfg.run.model) if cfg.run.model else default_model_path()
    lcm_dir = cfg.out / "lcm"
    _forget_other_runs(lcm_dir, cfg)
    summary = run_training(cfg.run, lcm_dir, resume="auto")
    seed, data_dir, lcd, optim = cfg.run.loop.seed, cfg.run.data.data_dir, cfg.run.method, cfg.run.resolved().optim

    teacher, lcm = LatentDiffusion.from_pretrained(teacher_path), LatentDiffusion.from_pretrained(lcm_dir)
    evaluator = FashionEvaluator(embedded_classifier(teacher_path), data_dir)
    prompts = fashion_eval_prompts(cfg.eval_samples, seed)
    rows, grid = [], []
    grid_prompts, grid_seeds = class_prompts(), list(range(10))
    teacher_method = "teacher Euler" if teacher.is_flow else "teacher DDIM"
    for model, method, sampler in ((teacher, teacher_method, Sampler.DDIM), (lcm, "LCM", Sampler.LCM)):
        for steps in (1, 2, 4, 8):
            rows.append(evaluate_row(model, Row(method, sampler, steps, cfg.w_eval), prompts, evaluator))
            grid.append(generate(model, grid_prompts, sampler, steps, cfg.w_eval, grid_seeds))
            print(f"{method} {steps} steps: {brief(rows[-1])}")
    row_labels = [f"{r.method} {r.steps} step{'' if r.steps == 1 else 's'}" for r in rows]
    grid_path = save_labelled_grid(torch.cat(grid), cfg.out / "demo_grid.png", row_labels, grid_prompts, scale=2)
    table = _table(rows)
    header = (
        f"# lcm demo\n\nLCD of the {'flow-matching' if teacher.is_flow else 'shipped'} Fashion-MNIST teacher "
        f"({teacher_path}), recipe {cfg.recipe}: {summary['steps']} steps, "
        f"batch {cfg.run.data.batch_size}, {lcd.solver.value} solver, k = {1000 // lcd.num_solver_steps}, "
        f"w ~ U[{lcd.w_min}, {lcd.w_max}], learning rate {optim.learning_rate:g} ({optim.lr_schedule}; "
        f"{lcd.w_lr_scale:g}x on the w projection), "
        f"{summary['wall_seconds']:.0f} s of training. "
        f"{teacher_method[0].upper() + teacher_method[1:]} with "
        f"{'FlowMatchEulerDiscreteScheduler' if teacher.is_flow else DEFAULT_SPACING} timesteps. "
        f"Every row: {cfg.eval_samples} images, guidance w = {cfg.w_eval}, the same prompts and seeds. FD-clf and "
        "KID-clf are computed in the shipped classifier's features against the 10,000 test images (not FID).\n\n"
        f"Grid rows: {teacher_method} 1, 2, 4, 8 steps; LCM 1, 2, 4, 8 steps.\n\n"
    )
    (cfg.out / "results.md").write_text(header + table)
    config = {"recipe": cfg.recipe, "eval_samples": cfg.eval_samples, "w_eval": cfg.w_eval, "run": cfg.run.to_dict()}
    settings = EvalSettings(num_samples=cfg.eval_samples, seed=seed)
    save_results(cfg.out / "results.json", settings, rows, config=config, train_wall_seconds=summary["wall_seconds"])
    print("\n" + table)
    print(f"grid: {grid_path}\ntable: {cfg.out / 'results.md'}\nmodel: {lcm_dir}")
    return {"config": config, "train_wall_seconds": summary["wall_seconds"], "records": rows}
