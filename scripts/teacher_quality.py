"""Teacher quality on the embedded benchmark: the table of the Fashion teacher's model card.

Rows: teacher DDIM at 1/2/4/8/25/50 steps, DPM-Solver++(2M) at 1/2/4/8/25, the VAE-reconstruction ceiling (test
images through the VAE) and the test images themselves; FD-clf, KID-clf and prompt accuracy in the shipped
classifier's features against the 10,000 test images.

    python scripts/teacher_quality.py [--model DIR] [--samples 1000] [--w 3] [--out teacher_quality.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lcm.data.fashion_mnist import load_fashion_mnist
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.run import Row, evaluate_row
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="teacher folder (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--w", type=float, nargs="+", default=[3.0], help="guidance weights to evaluate (default 3)")
    parser.add_argument("--out", default="teacher_quality.json", help="JSON output")
    args = parser.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    model = LatentDiffusion.from_pretrained(path)
    evaluator = FashionEvaluator(path / "classifier")
    prompts = fashion_eval_prompts(args.samples)
    rows = []

    test = load_fashion_mnist("test")
    idx = torch.arange(args.samples)
    reference = evaluator.evaluate(test.images[idx], test.labels[idx])
    rows.append({"method": "test images", **reference})
    with torch.no_grad():
        recon = torch.cat(
            [model.decode(model.encode_images(test.images[i : i + 500])) for i in range(0, args.samples, 500)]
        )
    rows.append({"method": "VAE reconstruction", **evaluator.evaluate(recon, test.labels[idx])})
    for w in args.w:
        for sampler, steps in [(Sampler.DDIM, s) for s in (1, 2, 4, 8, 25, 50)] + [
            (Sampler.DPM_SOLVER_PP_2M, s) for s in (1, 2, 4, 8, 25)
        ]:
            row = evaluate_row(model, Row(f"teacher {sampler.value}", sampler, steps, w), prompts, evaluator)
            rows.append(row)
            print(
                f"{row['method']:>14} {steps:>2} steps w={w}: FD-clf {row['fd_clf']:7.2f}  "
                f"KID {row['kid_clf']:.4f}  acc {row['prompt_accuracy']:.3f}  {row['seconds_per_image'] * 1e3:.1f} ms"
            )
    acc = json.loads((path / "classifier" / "config.json").read_text()).get("test_accuracy")
    result = {"model": str(path), "classifier_test_accuracy": acc, "samples_per_row": args.samples, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows[:2]:
        print(f"{r['method']:>20}: FD-clf {r['fd_clf']:.2f}  KID {r['kid_clf']:.4f}  acc {r['prompt_accuracy']:.3f}")
    print(f"classifier test accuracy {acc}; written {args.out}")


if __name__ == "__main__":
    main()
