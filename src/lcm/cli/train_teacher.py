"""``lcm train-teacher``: train the embedded Fashion-MNIST teacher."""

from __future__ import annotations

import argparse
import json

from lcm.cli.common import check_int
from lcm.limits import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_STEPS


def run_train_teacher(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcm.training.train_teacher import TeacherTrainConfig, train_teacher

    for flag in ("--vae-steps", "--unet-steps", "--classifier-steps", "--checkpoint-every", "--sample-every"):
        check_int(getattr(args, flag[2:].replace("-", "_")), flag, 1, MAX_STEPS)
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.max_train_images, "--max-train-images", 1, MAX_IMAGES)
    check_int(args.seed, "--seed", 0, MAX_SEED)
    try:
        channels = tuple(int(c) for c in args.unet_channels.split(","))
    except ValueError:
        raise ValueError(f"--unet-channels takes comma-separated integers, got {args.unet_channels!r}") from None
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"--unet-channels: block widths must be at least 1, got {args.unet_channels!r}")
    check_int(args.flow_heads, "--flow-heads", 1, 64)
    check_int(args.flow_layers, "--flow-layers", 1, 64)
    if args.vae_from and not (Path(args.vae_from) / "vae").is_dir():
        raise ValueError(f"--vae-from {args.vae_from} has no vae/ subfolder")
    cfg = TeacherTrainConfig(
        out=Path(args.out),
        objective=args.objective,
        vae_from=Path(args.vae_from) if args.vae_from else None,
        flow_heads=args.flow_heads,
        flow_layers=args.flow_layers,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        classifier_steps=args.classifier_steps,
        unet_batch=args.batch_size,
        unet_channels=channels,
        max_train_images=args.max_train_images,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
    )
    report = train_teacher(cfg)
    keys = ("scaling_factor", "vae_test_mse", "classifier_test_accuracy", "parameters", "wall_seconds")
    print(json.dumps({k: report[k] for k in keys if k in report}))
    print(f"teacher written to {cfg.out} (sample grids in {cfg.out / 'samples'})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train an embedded Fashion-MNIST teacher (VAE, UNet, evaluation classifier; or a flow MMDiT)",
        description=(
            "Train the embedded default: an AutoencoderKL, an epsilon-prediction UNet2DConditionModel conditioned on "
            "MiniLM token states, and the classifier behind the offline metrics. With --objective flow, train the "
            "embedded flow-matching teacher instead: an SD3Transformer2DModel (MMDiT) on the latents of an existing "
            "teacher's VAE, whose VAE, text encoder and classifier it reuses. Writes a diffusers-format folder. "
            "Rerunning the same command resumes from the last checkpoint of each stage."
        ),
    )
    p.add_argument("--out", required=True, help="output model folder (checkpoints go to OUT/checkpoints)")
    p.add_argument(
        "--objective",
        choices=("eps", "flow"),
        default="eps",
        help="eps: VAE + epsilon-prediction UNet + classifier (default); flow: a rectified-flow MMDiT only",
    )
    p.add_argument(
        "--vae-from",
        help="flow: the teacher folder whose VAE, text encoder and classifier are reused (default: the shipped one)",
    )
    p.add_argument("--flow-heads", type=int, default=3, help="flow: attention heads of 32 dims, the width (default 3)")
    p.add_argument("--flow-layers", type=int, default=4, help="flow: joint transformer blocks (default 4)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: Debian package or download)")
    p.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give equal weights (default 0)")
    p.add_argument("--vae-steps", type=int, default=1200, help="VAE optimisation steps, batch 128 (default 1200)")
    p.add_argument("--unet-steps", type=int, default=6000, help="UNet (flow: MMDiT) optimisation steps (default 6000)")
    p.add_argument("--classifier-steps", type=int, default=2500, help="classifier steps, batch 128 (default 2500)")
    p.add_argument("--batch-size", type=int, default=128, help="UNet batch size (default 128)")
    p.add_argument("--unet-channels", default="32,64,64", help="UNet block widths (default 32,64,64)")
    p.add_argument(
        "--max-train-images",
        type=int,
        help="train, and measure the VAE and classifier, on the first N images only (smoke runs)",
    )
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--sample-every", type=int, default=1000, help="UNet steps between sample grids (default 1000)")
    p.set_defaults(func=run_train_teacher)
