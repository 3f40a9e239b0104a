"""What several commands share: list flags, range checks, the training-loop and data flags, the run configuration
(saved with a run, read back by ``--resume`` and ``--config``) and the configs built from them."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"{flag}: give one or more guidance weights w >= 0, got {text!r}")
    return values


def check_int(value: int | None, flag: str, low: int, high: int | None = None) -> None:
    """``ValueError`` naming ``flag`` and its range unless ``low <= value (<= high)``; None passes (unset)."""
    if value is None or (value >= low and (high is None or value <= high)):
        return
    allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
    raise ValueError(f"{flag} must be {allowed}, got {value}")


def check_float(value: float | None, flag: str, low: float, *, open_low: bool = False, high: float | None = None):
    """``ValueError`` naming ``flag`` unless ``value`` is a finite number in its range; None passes (unset)."""
    if value is None:
        return
    above = value > low if open_low else value >= low
    if math.isfinite(value) and above and (high is None or value < high):
        return
    bound = f"> {low}" if open_low else f">= {low}"
    allowed = f"a number {bound}" + (f" and < {high}" if high is not None else "")
    raise ValueError(f"{flag} must be {allowed}, got {value}")


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
    g.add_argument(
        "--out",
        required=True,
        help="run folder: the exported model, and train/ (checkpoints, logs, validation grids, run_config.json)",
    )
    g.add_argument(
        "--config",
        help="start from the settings of a run_config.json (or a JSON object of flags); flags typed here override",
    )
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
    g.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the student, target and teacher UNets (fixed shapes; compiled once per machine, kept in "
        "$LCM_CACHE/inductor). auto (default): on CUDA only. On a CPU, on needs a C++ compiler (without one it "
        "trains eagerly, saying so); for the embedded teacher it compiles for about 3 minutes on a cold cache (about "
        "15 s once cached), then steps about 1.25x faster (README, Performance); a larger UNet compiles for longer",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, t and w draws (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument(
        "--validate-every",
        type=int,
        default=500,
        help="steps between validation grids, and one at the end (default 500; 0: no validation at all)",
    )
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines (default 10)")
    g.add_argument(
        "--report-to",
        default="tensorboard",
        help="experiment trackers, comma-separated, any Accelerate supports: tensorboard (default), wandb, comet_ml, "
        "mlflow, aim, clearml, dvclive, swanlab, trackio; logs, and validation grids where the tracker takes images",
    )
    g.add_argument(
        "--resume",
        help="'latest' or a checkpoint folder: continue exactly where it stopped, with the run's saved settings "
        "(only --out is needed; refused when there is nothing to resume). 'auto': resume when --out holds a "
        "checkpoint, else start. Without --resume, a folder that holds another run or a model is refused",
    )
    g.add_argument(
        "--max-bad-steps",
        type=int,
        default=10,
        help="stop after this many optimiser steps in a row with a non-finite loss or gradient (default 10)",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist[:classes], an image folder with metadata.jsonl, a datasets name or saved folder, "
        "or WebDataset shards (path, brace pattern or URL) (default fashion-mnist)",
    )
    d.add_argument("--image-column", help="image column of a datasets dataset (default image)")
    d.add_argument("--caption-column", help="caption column / metadata key (default text)")
    d.add_argument(
        "--resolution",
        type=int,
        help="training resolution, a multiple of 8 up to 8192 (default: the model's native size)",
    )
    d.add_argument("--random-crop", action="store_true", help="random instead of centre crop")
    d.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0; at most 256)")
    d.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    d.add_argument(
        "--allow-outside-files",
        action="store_true",
        help="let a folder's metadata.jsonl name image files outside the folder (../x.png, absolute paths); by "
        "default such lines are skipped and counted",
    )
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
        compile=args.compile,
        report_to=tuple(t.strip() for t in args.report_to.split(",") if t.strip()),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        log_every=args.log_every,
        resume=args.resume,
        max_bad_steps=args.max_bad_steps,
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
        allow_outside=args.allow_outside_files,
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


def check_consistency_flags(args: argparse.Namespace) -> None:
    """The LCD / LCF / LoRA / validation flags, each against its range, before anything is loaded."""
    check_int(args.num_solver_steps, "--num-solver-steps", 1, 1000)
    check_float(args.huber_c, "--huber-c", 0, open_low=True)
    check_float(args.ema_decay, "--ema-decay", 0, high=1)
    check_int(args.lora_rank, "--lora-rank", 1)
    check_float(args.lora_alpha, "--lora-alpha", 0, open_low=True)
    check_float(args.validation_w, "--validation-w", 0)
    if args.lora_targets is not None and not [t for t in args.lora_targets.split(",") if t.strip()]:
        raise ValueError("--lora-targets takes comma-separated module names, got none")


_NOT_FLAGS = ("func", "command", "typed_flags", "command_parser")
# Flags naming a model whose default is the shipped one: a typed default equals the flag left out.
_MODEL_FLAGS = ("teacher", "model")


def typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, str]:
    """``{dest: option}`` of the optional flags typed in ``argv`` (argparse's unique prefixes resolved)."""
    options = parser._option_string_actions  # argparse keeps no record of which flags were typed
    typed = {}
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            typed[options[matches[0]].dest] = matches[0]
    return typed


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _kind(action: argparse.Action) -> str | None:
    """What a flag's value must be when it comes from a JSON file, or None when any JSON value is a mistake."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "true or false"
    if isinstance(action, argparse._AppendAction):
        return "a list of strings"
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    if action.type is None:
        return "one of " + ", ".join(map(json.dumps, action.choices)) if action.choices else "a string"
    return None


def _fits(action: argparse.Action, value: Any) -> bool:
    if value is None:
        return action.default is None  # unset: only where the flag has no default
    kind = _kind(action)
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return False
    if kind == "an integer":
        return isinstance(value, int)
    if kind == "a number":
        return isinstance(value, int | float)
    if action.choices:
        return value in action.choices
    return isinstance(value, str) and kind == "a string"


def _typed(values: dict[str, Any], parser: argparse.ArgumentParser, where: str) -> dict[str, Any]:
    """``values`` (flag dests → JSON values) checked against the flags' own types and choices, in one line."""
    actions = {a.dest: a for a in parser._actions}
    for dest, value in values.items():
        action = actions.get(dest)
        if action is not None and not _fits(action, value):
            option = action.option_strings[-1] if action.option_strings else dest
            unset = " (or null)" if action.default is None else ""
            raise ValueError(f"{where}: {option} must be {_kind(action)}{unset}, got {json.dumps(value)[:80]}")
    return values


def _config_file(path: str, command: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"--config {path}: not a readable JSON file ({err})") from None
    if isinstance(record, dict) and isinstance(record.get("flags"), dict):
        if record.get("command") not in (None, command):
            raise ValueError(f"--config {path} is the configuration of an lcm {record['command']} run, not {command}")
        record = record["flags"]
    if not isinstance(record, dict):
        raise ValueError(f"--config {path} must hold a JSON object of flags")
    flags = {k.lstrip("-").replace("-", "_"): v for k, v in record.items()}
    known = {a.dest for a in parser._actions} - set(_NOT_FLAGS)
    if unknown := sorted(k for k in flags if k not in known):
        raise ValueError(f"--config {path}: unknown flag(s) {', '.join(unknown)} for lcm {command}")
    return _typed(flags, parser, f"--config {path}")


def _same(dest: str, typed: Any, saved: Any) -> bool:
    """Whether a typed flag keeps a resumed run's value (a model flag compared by the folder it resolves to)."""
    if dest in _MODEL_FLAGS:
        from lcm.locations import local_path_or_none
        from lcm.sample import default_model_path

        def where(value):
            local = local_path_or_none(str(value or default_model_path()))
            return str(local.resolve()) if local is not None else value

        return where(typed) == where(saved)
    return typed == saved


def settle_flags(args: argparse.Namespace, command: str) -> None:
    """Fill ``args`` from the run being resumed (its ``run_config.json``, or the record in its newest intact
    checkpoint when that file is gone) or from ``--config``, keeping every flag typed on the command line; a typed
    flag that would change a resumed run is refused in one line, as is a value of the wrong type in either file."""
    from lcm.training.run_folder import RESUME_MAY_CHANGE, RUN_CONFIG, TRAIN_DIR, read_run_record

    typed = getattr(args, "typed_flags", {})
    parser = args.command_parser
    own = {k: v for k, v in vars(args).items() if k not in _NOT_FLAGS}
    saved = read_run_record(Path(args.out) / TRAIN_DIR) if args.resume else None
    if saved is not None and isinstance(saved.get("flags"), dict):
        where = Path(args.out) / TRAIN_DIR / RUN_CONFIG
        if args.config:
            raise ValueError(f"--config starts a run; --resume takes the run's own settings from {where}")
        if saved.get("command") != command:
            raise ValueError(f"{args.out} is an lcm {saved.get('command')} run: resume it with that command")
        base = _typed({k: v for k, v in saved["flags"].items() if k in own}, parser, str(where))
        for dest, option in typed.items():
            if dest not in RESUME_MAY_CHANGE and dest in base and not _same(dest, own.get(dest), base[dest]):
                raise ValueError(
                    f"{option} {_show(own.get(dest))} differs from this run's {_show(base[dest])} (saved in {where}): "
                    "drop the flag to resume, or start a new --out"
                )
    elif args.config:
        base = _config_file(args.config, command, parser)
    else:
        return
    for dest, value in base.items():
        if dest in own and dest not in typed and dest not in ("out", "resume", "config"):
            setattr(args, dest, value)


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags to save with a run (everything but the parser's own entries)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_FLAGS}


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
