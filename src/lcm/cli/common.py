"""What several commands share: list flags, the training-loop and data flags, and the configs built from them."""

from __future__ import annotations

import argparse

from lcm.maths.losses import LossType
from lcm.models.student import StudentKind
from lcm.training.loop import MIXED_PRECISION

# Stable Diffusion 1.x/2.x's training schedule, used where no scheduler config is given.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}: steps must be at least 1, got {text!r}")
    return values


def float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{flag}: give one or more guidance weights w >= 0, got {text!r}")
    return values


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_consistency_args(p: argparse.ArgumentParser, title: str):
    """Flags LCD and LCF share: student kind, skipping grid, distance, target, LoRA."""
    g = p.add_argument_group(title)
    g.add_argument(
        "--student", choices=[k.value for k in StudentKind], default="full", help="full UNet (+w-embedding) or LoRA"
    )
    g.add_argument("--num-solver-steps", type=int, default=50, help="N of the skipping grid; k = 1000 // N (50)")
    g.add_argument(
        "--loss", choices=[k.value for k in LossType], default="huber", help="consistency distance (default huber)"
    )
    g.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber c (default 0.001)")
    g.add_argument("--ema-decay", type=float, default=0.95, help="target EMA decay mu, full student (default 0.95)")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1)")
    g.add_argument("--lora-targets", help="comma-separated module names to adapt (default: LCM-LoRA's list)")
    g.add_argument("--fuse-lora", action="store_true", help="export the LoRA merged into a full LCM folder")
    return g


def add_training_args(p: argparse.ArgumentParser, lr_help: str, steps: int) -> None:
    """Flags of the shared training loop (distill and finetune)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, logs/ (TensorBoard), validation/, export")
    g.add_argument("--max-steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=32, help="samples per device per micro-batch (default 32)")
    g.add_argument("--learning-rate", type=float, help=f"AdamW learning rate ({lr_help})")
    g.add_argument("--lr-schedule", default="constant", help="constant, constant_with_warmup, linear, cosine, …")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (GPU, saves memory)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no", help="autocast (VAE stays fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for UNet activation memory")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, t and w draws (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--validate-every", type=int, default=500, help="steps between validation grids (default 500)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines (default 10)")
    g.add_argument("--resume", help="'latest' or a checkpoint folder: continue exactly where it stopped")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist[:classes], an image folder with metadata.jsonl, a datasets name or saved folder, "
        "or WebDataset shards (path, brace pattern or URL) (default fashion-mnist)",
    )
    d.add_argument("--image-column", help="image column of a datasets dataset (default image)")
    d.add_argument("--caption-column", help="caption column / metadata key (default text)")
    d.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    d.add_argument("--random-crop", action="store_true", help="random instead of centre crop")
    d.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    d.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    v = p.add_argument_group("validation")
    v.add_argument("--validation-prompt", action="append", help="prompt of the validation grid (repeatable)")
    v.add_argument(
        "--validation-w",
        type=float,
        default=None,
        help="guidance w of the validation grid (default: the trained LCM's default w)",
    )


def loop_config(args: argparse.Namespace, default_lr: float):
    from pathlib import Path

    from lcm.training.loop import TrainConfig

    return TrainConfig(
        out=Path(args.out),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate if args.learning_rate is not None else default_lr,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.lr_warmup_steps,
        adam_weight_decay=args.adam_weight_decay,
        use_8bit_adam=args.use_8bit_adam,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        log_every=args.log_every,
        resume=args.resume,
    )


def data_config(args: argparse.Namespace):
    from pathlib import Path

    from lcm.training.runs import DataConfig

    return DataConfig(
        source=args.data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        resolution=args.resolution,
        center_crop=not args.random_crop,
        random_flip=args.random_flip,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )


def validation_prompts(args: argparse.Namespace, model_is_embedded: bool) -> tuple[str, ...]:
    if args.validation_prompt:
        return tuple(args.validation_prompt)
    if model_is_embedded:
        from lcm.data.captions import class_prompts

        return tuple(class_prompts())
    return ("a photo of an astronaut riding a horse", "a cosy cabin in a snowy forest, golden hour")


def lora_settings(args: argparse.Namespace):
    from lcm.training.task import LoraSettings

    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
    return LoraSettings(
        rank=args.lora_rank, alpha=args.lora_alpha, fuse=args.fuse_lora, **({"targets": targets} if targets else {})
    )
