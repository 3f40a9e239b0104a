"""The LCM-LoRA paper's acceleration vector on the embedded benchmark: a style LoRA of the shipped teacher
(``lcm tune`` on some of the classes) plus the LCM-LoRA of the *base* teacher (``lcm distill --student lora``),
merged by ``lcm merge`` without any training of the pair, against the style model sampled by its teacher sampler.

    python scripts/style_stack.py --out runs/style-stack [--classes 0,1,2,3,4] [--seed 0] [--samples 1000]

Every row is scored on prompts of the style's classes (FD-clf against those classes' test images, prompt accuracy
among them; the shipped classifier's features, not FID), w = 3, the same prompts and noise in every row:

- the style model (teacher + style LoRA) with DDIM at 4 and 25 steps (its own few-step and full-quality rows);
- the merged style + LCM-LoRA at 1, 2, 4 and 8 steps, and the unmerged stack at 4 (it must equal the merged row);
- the LCM-LoRA on the base, without the style, at 4 steps (what the accelerator alone makes of these prompts).

Writes OUT/style (the tuned LoRA), OUT/lcm-lora, OUT/merged, OUT/eval/*/results.json (``lcm eval``'s schema) and
OUT/style_stack.md. Finished stages and rows are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcm.config import RunConfig, override
from lcm.config.recipes import EVALUATION, recipe_config
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.run import Row, evaluate_rows
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec
from lcm.models.merge import merge_loras
from lcm.sample import Sampler
from lcm.shipped import default_model_path
from lcm.training.runs import run_training

# The style: a rank-8 LoRA of the teacher tuned with its own loss on the style's classes (1,000 steps of batch 32).
STYLE = {
    "student.kind": "lora",
    "student.lora_rank": 8,
    "optim.learning_rate": 1e-3,
    "optim.lr_schedule": "cosine_floor",
    "optim.lr_warmup_steps": 50,
    "data.batch_size": 32,
    "loop.max_steps": 1000,
    "loop.checkpoint_every": 500,
    "loop.validate_every": 0,
    "loop.compile": "off",
    "loop.report_to": [],
}
# The accelerator: the demo recipe (k = 100, cosine rate) with a rank-8 LoRA student at 1e-3 (docs/fidelity.md's
# lora8-k100-cos row, on the demo recipe), distilled on all ten classes of the base teacher.
ACCELERATOR = {"student.kind": "lora", "student.lora_rank": 8, "optim.learning_rate": 1e-3, "loop.report_to": []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", default="0,1,2,3,4", help="the style's classes (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="training seed of both LoRAs")
    p.add_argument("--samples", type=int, default=1000, help="images per row")
    p.add_argument("--style-scale", type=float, default=1.0, help="the style LoRA's scale in the stack")
    a = p.parse_args()
    classes = [int(c) for c in a.classes.split(",")]
    teacher, w = default_model_path(), EVALUATION["demo"]["w"]
    style, accelerator, merged = a.out / "style", a.out / "lcm-lora", a.out / "merged"
    if not (style / "lcm_tune.json").is_file():
        tune = override(RunConfig(command="tune"), {**STYLE, "data.source": f"fashion-mnist:{a.classes}"})
        run_training(override(tune, {"loop.seed": a.seed}), style, resume="auto")
    if not (accelerator / "lcm_lora.json").is_file():
        run_training(recipe_config("demo-1500", {**ACCELERATOR, "loop.seed": a.seed}), accelerator, resume="auto")
    stack = [LoraSpec(str(style), a.style_scale, "style"), LoraSpec(str(accelerator), 1.0, "lcm")]
    if not (merged / "unet").is_dir():
        merge_loras(teacher, stack, merged)

    evaluator = FashionEvaluator(teacher / "classifier", classes=classes)
    prompts = fashion_eval_prompts(a.samples, 0, classes)
    settings = EvalSettings(prompts=f"fashion-mnist:{a.classes}", num_samples=a.samples)
    models = {  # name: (model, rows)
        "style": (
            LatentDiffusion.from_pretrained(teacher, loras=stack[:1]),
            [Row("style model, DDIM", Sampler.DDIM, s, w) for s in (4, 25)],
        ),
        "merged": (
            LatentDiffusion.from_pretrained(merged),
            [Row("style + LCM-LoRA, merged", Sampler.LCM, s, w) for s in (1, 2, 4, 8)],
        ),
        "stack": (
            LatentDiffusion.from_pretrained(teacher, loras=stack),
            [Row("style + LCM-LoRA, stacked", Sampler.LCM, 4, w)],
        ),
        "lcm-lora": (
            LatentDiffusion.from_pretrained(accelerator),
            [Row("LCM-LoRA alone (no style)", Sampler.LCM, 4, w)],
        ),
    }
    records = []
    for name, (model, rows) in models.items():
        records += evaluate_rows(model, rows, prompts, evaluator, a.out / "eval" / name / "results.json", settings)
    best = next(r for r in records if r.method == "style model, DDIM" and r.steps == 25).metrics["fd_clf"]
    cells = [
        [r.method, r.steps, f"{r.metrics['fd_clf']:.1f}", f"{r.metrics['fd_clf'] / best:.2f}",
         f"{r.metrics['prompt_accuracy']:.3f}"]
        for r in records
    ]  # fmt: skip
    table = markdown_table(["model", "steps", "FD-clf ↓", "÷ style DDIM-25", "prompt accuracy ↑"], cells, left=1)
    intro = (
        f"Style: classes {a.classes}, LoRA rank 8 tuned 1,000 steps (scale {a.style_scale:g} in the stack); "
        f"accelerator: the base teacher's LCM-LoRA (demo recipe, rank 8); seed {a.seed}; {a.samples} images per "
        f"row, w = {w:g}, FD-clf against the test images of the style's classes.\n\n"
    )
    (a.out / "style_stack.md").write_text(intro + table)
    print(intro + table)


if __name__ == "__main__":
    main()
