"""The embedded LCF demonstration: distil an LCM on some classes only, then fine-tune it (LCF, no teacher) on the
held-out classes, and measure both class sets before and after.

    python scripts/lcf_demo.py --out runs/lcf [--seen 0,1,2,3,4] [--distill-steps 1000] [--finetune-steps 500]

Rows (FD-clf / prompt accuracy at 1, 2, 4 steps, against the test images of the class set evaluated): the LCM
distilled on the seen classes, the same LCM after LCF on the held-out classes, and the teacher (DDIM, same steps).
Both runs start from the "before-fidelity" recipe (lcm.config.recipes; N = 50, a constant rate). Writes
OUT/lcf_demo.json and prints a Markdown table. Finished stages are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lcm.config import RunConfig, override
from lcm.config.recipes import EVALUATION, recipe_config
from lcm.data.captions import CaptionSet
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.prompts import EvalPrompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.run import Row, evaluate_row
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, default_model_path
from lcm.training.runs import run_training


def prompts_for(classes: list[int], n: int, seed: int = 0) -> EvalPrompts:
    captions = CaptionSet()
    labels = torch.tensor(classes)[torch.arange(n) % len(classes)]
    idx = captions.sample(labels, 0.0, torch.Generator().manual_seed(seed))
    return EvalPrompts([captions.captions[i] for i in idx], labels, list(range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seen", default="0,1,2,3,4", help="classes the LCM is distilled on")
    parser.add_argument("--distill-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    seen = [int(c) for c in args.seen.split(",")]
    held = [c for c in range(10) if c not in seen]
    out, teacher = Path(args.out), default_model_path()
    lcd_dir, lcf_dir = out / "lcd-seen", out / "lcf-held"
    w_eval = EVALUATION["before-fidelity"]["w"]
    if not (lcd_dir / "unet").is_dir():
        changes = {"data.source": "fashion-mnist:" + args.seen, "loop.max_steps": args.distill_steps}
        run_training(recipe_config("before-fidelity", changes), lcd_dir, resume="auto")
    if not (lcf_dir / "unet").is_dir():
        base = recipe_config("before-fidelity")  # its batch and loop; LCF's own method settings
        finetune = RunConfig(command="finetune", model=str(lcd_dir), data=base.data, loop=base.loop)
        changes = {"data.source": "fashion-mnist:" + ",".join(map(str, held)), "loop.max_steps": args.finetune_steps}
        changes |= {"method.w": w_eval, "optim.learning_rate": args.finetune_lr}
        run_training(override(finetune, changes), lcf_dir, resume="auto")
    models = {
        "teacher DDIM": (teacher, Sampler.DDIM),
        "LCM (seen classes)": (lcd_dir, Sampler.LCM),
        "LCM + LCF (held-out)": (lcf_dir, Sampler.LCM),
    }
    results = []
    for split, classes in (("held-out", held), ("seen", seen)):
        evaluator = FashionEvaluator(teacher / "classifier", classes=classes)
        prompts = prompts_for(classes, args.samples)
        for name, (path, sampler) in models.items():
            model = LatentDiffusion.from_pretrained(path)
            for steps in (1, 2, 4):
                row = evaluate_row(model, Row(name, sampler, steps, w_eval), prompts, evaluator)
                results.append({"classes": split, **row})
                print(
                    f"{split:>8} {name:>22} {steps} steps: FD-clf {row['fd_clf']:.1f} acc {row['prompt_accuracy']:.3f}"
                )
    (out / "lcf_demo.json").write_text(json.dumps({"seen": seen, "held_out": held, "rows": results}, indent=2))
    table = []
    for split in ("held-out", "seen"):
        for name in models:
            rs = [r for r in results if r["classes"] == split and r["method"] == name]
            table.append(
                [split, name, *(f"{r['fd_clf']:.1f}" for r in rs), *(f"{r['prompt_accuracy']:.3f}" for r in rs)]
            )
    print(markdown_table(["classes", "model", "FD-clf 1", "2", "4", "accuracy 1", "2", "4"], table, left=2))


if __name__ == "__main__":
    main()
