"""``lcm merge``: fuse LoRAs (a style LoRA, an LCM-LoRA, ...) into a base model and write a diffusers folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lcm.cli.common import add_lora_flags, lora_specs


def run_merge(args: argparse.Namespace) -> int:
    from lcm.models.merge import merge_loras
    from lcm.training.runs import check_out

    loras = lora_specs(args)
    if not loras:
        raise ValueError("lcm merge needs one or more --lora FILE[:SCALE]")
    check_out(args.out, {"--model": ("base model", args.model), **{f"--lora {s}": ("LoRA", s.path) for s in loras}})
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} is not empty: choose a new or empty folder")
    out = merge_loras(args.model, loras, args.out)
    print(f"merged {len(loras)} LoRA{'s' if len(loras) > 1 else ''} into {args.model}: {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fuse LoRAs (style LoRAs, an LCM-LoRA) into a base model's UNet and write a diffusers folder",
        description=(
            "Fuse a stack of LoRAs into --model's UNet (each adapted weight becomes W + sum of SCALE·ΔW) and write a "
            "diffusers folder with a model card. With an LCM-LoRA in the stack the result is an LCM (LCMScheduler "
            "on its skipping grid), e.g. an LCM of your own fine-tune or style without training: "
            "lcm merge --model BASE --lora style.safetensors:0.8 --lora lcm-lora:1 --out merged."
        ),
    )
    p.add_argument("--model", required=True, help="the base model: a diffusers folder or hub id")
    add_lora_flags(p)
    p.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    p.set_defaults(func=run_merge)
