"""The embedded LCF demonstration: distil an LCM on some classes only, then fine-tune it (LCF, no teacher) on the
held-out classes, and measure both class sets before and after.

    python scripts/lcf_demo.py --out runs/lcf [--seen 0,1,2,3,4] [--distill-steps 1000] [--finetune-steps 500]

Rows (FD-clf / prompt accuracy at 1, 2, 4 steps, against the test images of the class set evaluated): the LCM
distilled on the seen classes, the same LCM after LCF on the held-out classes, and the teacher (DDIM, same steps).
Both runs start from the "before-fidelity" recipe (lcm.config.recipes; N = 50, a constant rate). Writes
OUT/eval-held-out/results.json and OUT/eval-seen/results.json (`lcm eval`'s schema) and prints a Markdown table.
Finished stages and rows are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lcm.config import RunConfig, override
from lcm.config.recipes import EVALUATION, recipe_config
from lcm.data.captions import CaptionSet
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import EvalPrompts
from lcm.evaluation.report import markdown_table
from lcm.evaluation.run import Row, evaluate_rows
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler
from lcm.shipped import default_model_path
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
    table = []
    for split, classes in (("held-out", held), ("seen", seen)):
        evaluator = FashionEvaluator(teacher / "classifier", classes=classes)
        prompts, path = prompts_for(classes, args.samples), out / f"eval-{split}" / "results.json"
        settings = EvalSettings(prompts=f"fashion-mnist:{','.join(map(str, classes))}", num_samples=args.samples)
        for name, (folder, sampler) in models.items():
            model = LatentDiffusion.from_pretrained(folder)
            rows = [Row(name, sampler, steps, w_eval) for steps in (1, 2, 4)]
            rs = evaluate_rows(model, rows, prompts, evaluator, path, settings, classes=classes)
            fd, acc = (f"{r.metrics['fd_clf']:.1f}" for r in rs), (f"{r.metrics['prompt_accuracy']:.3f}" for r in rs)
            table.append([split, name, *fd, *acc])
    print(markdown_table(["classes", "model", "FD-clf 1", "2", "4", "accuracy 1", "2", "4"], table, left=2))


if __name__ == "__main__":
    main()
