"""What several commands share: list flags, range checks and the speed flags of the commands that run a model (the
training commands' flags come from the run-config tree: :mod:`lcm.cli.flags`)."""

from __future__ import annotations

import argparse
import math

# Stable Diffusion 1.x/2.x's training schedule, used where no scheduler config is given.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def add_lora_flags(p: argparse.ArgumentParser, base: str = "--model", extra: str = "") -> None:
    """``--lora FILE[:SCALE][:ROLE]`` (repeatable) and ``--lora-scale``, for the commands that sample."""
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE][:lcm|style]",
        help=f"a LoRA file or folder (diffusers', kohya's or peft's naming; .safetensors) applied to {base}'s UNet at "
        "SCALE (default --lora-scale); repeat to stack, e.g. a style LoRA at 0.8 and an LCM-LoRA at 1: each adapted "
        "weight becomes W + sum of SCALE·ΔW. The LCM-LoRA among them (marked :lcm, or an lcm_lora.json beside it; "
        "else the one LoRA that is neither marked :style nor made by lcm tune) makes the model sample as an LCM"
        + extra,
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of a --lora given without :SCALE (default 1)")


def lora_specs(args: argparse.Namespace) -> tuple:
    """The ``--lora`` stack, each file checked to exist, before any model is loaded."""
    from lcm.locations import local_path_or_none
    from lcm.models.lora import LoraSpec

    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if not args.lora and args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora")
    specs = tuple(LoraSpec.parse(text, args.lora_scale) for text in args.lora or ())
    for spec in specs:
        if not local_path_or_none(spec.path).exists():
            raise ValueError(f"--lora {spec.path}: no such file or folder")
    return specs


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
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"{flag}: give one or more guidance weights w >= 0, got {text!r}")
    return values


def check_int(value: int | None, flag: str, low: int, high: int | None = None) -> None:
    """``ValueError`` naming ``flag`` and its range unless ``low <= value (<= high)``; None passes (unset)."""
    if value is None or (value >= low and (high is None or value <= high)):
        return
    allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
    raise ValueError(f"{flag} must be {allowed}, got {value}")


def add_speed_args(p: argparse.ArgumentParser, compile_note: str) -> argparse._ArgumentGroup:
    """``--device``, ``--dtype`` and ``--compile`` of the commands that run a model (sample, serve); returns their
    argument group."""
    from lcm.models.fast import DTYPES, Compile

    speed = p.add_argument_group("speed")
    speed.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    speed.add_argument(
        "--dtype", choices=list(DTYPES), help="network precision (default: bf16/fp16 on CUDA, fp32 on CPU)"
    )
    speed.add_argument(
        "--compile",
        choices=[c.value for c in Compile],
        default=Compile.AUTO.value,
        help="compile the UNet and VAE decoder (torch.compile; CUDA graphs on GPU). auto (default): on CUDA only; "
        + compile_note,
    )
    return speed
