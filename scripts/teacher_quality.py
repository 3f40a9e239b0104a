"""Teacher quality on the embedded benchmark: the table of the Fashion teacher's model card.

Rows: teacher DDIM at 1/2/4/8/25/50 steps, DPM-Solver++(2M) at 1/2/4/8/25, the VAE-reconstruction ceiling (test
images through the VAE) and the test images themselves; FD-clf, KID-clf and prompt accuracy in the shipped
classifier's features against the 10,000 test images.

    python scripts/teacher_quality.py [--model DIR] [--samples 1000] [--w 3] [--out teacher_quality/results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lcm.data.fashion_mnist import load_fashion_mnist
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import fashion_eval_prompts
from lcm.evaluation.run import Row, evaluate_rows
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler
from lcm.shipped import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="teacher folder (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--w", type=float, nargs="+", default=[3.0], help="guidance weights to evaluate (default 3)")
    parser.add_argument("--out", default="teacher_quality/results.json", help="results (lcm eval's schema)")
    args = parser.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    model = LatentDiffusion.from_pretrained(path)
    evaluator = FashionEvaluator(path / "classifier")
    prompts = fashion_eval_prompts(args.samples)
    test = load_fashion_mnist("test")
    idx = torch.arange(args.samples)
    images = test.images[idx]
    with torch.no_grad():
        recon = torch.cat([model.decode(model.encode_images(images[i : i + 500])) for i in range(0, len(idx), 500)])
    references = {  # the ceilings: the test images themselves and their VAE reconstructions
        "test images": evaluator.evaluate(images, test.labels[idx]),
        "VAE reconstruction": evaluator.evaluate(recon, test.labels[idx]),
    }
    samplers = [(Sampler.DDIM, s) for s in (1, 2, 4, 8, 25, 50)] + [
        (Sampler.DPM_SOLVER_PP_2M, s) for s in (1, 2, 4, 8, 25)
    ]
    rows = [Row(f"teacher {sampler.value}", sampler, steps, w) for w in args.w for sampler, steps in samplers]
    acc = json.loads((path / "classifier" / "config.json").read_text()).get("test_accuracy")
    about = {"classifier_test_accuracy": acc, "references": references}
    settings = EvalSettings(num_samples=args.samples)
    evaluate_rows(model, rows, prompts, evaluator, Path(args.out), settings, **about)
    for name, r in references.items():
        print(f"{name:>20}: FD-clf {r['fd_clf']:.2f}  KID {r['kid_clf']:.4f}  acc {r['prompt_accuracy']:.3f}")
    print(f"classifier test accuracy {acc}; written {args.out}")


if __name__ == "__main__":
    main()
