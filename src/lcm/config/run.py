"""The run-config tree of ``lcm distill`` and ``lcm finetune`` (docs/design.md §10): every default, range, choice
and help text of a training run, each written once, as a knob of one section.

    RunConfig
    ├── data        DataConfig        what is read, at what size, how many per batch
    ├── student     StudentConfig     full UNet or LoRA, and the LoRA's shape
    ├── method      LCDConfig | LCFConfig | TuneConfig   what the run learns (lcm.config.method)
    ├── optim       OptimConfig       AdamW and its schedule
    ├── loop        LoopConfig        length, precision, seeds, checkpoints, logs, validation cadence
    └── validation  ValidationConfig  the validation grid's prompts and w

Values are checked when a section is made (one line naming the flag); the CLI's flags, the JSON a run folder keeps
and the comparison a resume makes all come from these classes (:mod:`lcm.config.knobs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from lcm.config.knobs import from_dict, knob, to_dict, validate
from lcm.config.method import LCDConfig, LCFConfig, TuneConfig
from lcm.limits import MAX_BATCH, MAX_IMAGE_SIDE, MAX_SEED, MAX_STEPS, MAX_WORKERS

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "TRACKERS",
    "Compile",
    "DataConfig",
    "LoopConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "StudentKind",
    "ValidationConfig",
    "section_classes",
]

MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's autocast modes
# diffusers.optimization's schedules that need no extra arguments, and ours (lcm.training.optim.cosine_floor)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LR_SCHEDULES += ("cosine_floor",)
# Accelerate's experiment trackers (LoggerType values), for --report-to
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
# The layers LCM-LoRA adapts (attention, feed-forward, resnet convolutions, samplers, time projections).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
DEFAULT_LORA_TARGETS += ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
DEFAULT_LORA_TARGETS += ("time_emb_proj",)


class StudentKind(str, Enum):
    FULL = "full"  # every UNet weight trained, w-conditioned, EMA target
    LORA = "lora"  # LoRA adapters only; teacher = adapters off; target = adapters on under no_grad


class Compile(str, Enum):
    AUTO = "auto"  # compile on CUDA (launch-bound without it); eager on the CPU (a minute's compile per shape)
    ON = "on"
    OFF = "off"  # eager

    def enabled(self, device) -> bool:
        return self is Compile.ON or (self is Compile.AUTO and device.type == "cuda")


@dataclass(frozen=True)
class DataConfig:
    source: str = knob(
        "fashion-mnist",
        "fashion-mnist[:classes], an image folder with metadata.jsonl, a datasets name or saved folder, a latent "
        "cache (lcm cache) or WebDataset shards (path, brace pattern or URL)",
        flag="--data",
    )
    image_column: str | None = knob(None, "image column of a datasets dataset", default_text="image")
    caption_column: str | None = knob(None, "caption column / metadata key", default_text="text, else caption")
    resolution: int | None = knob(
        None, "training resolution, a multiple of 8", lo=8, hi=MAX_IMAGE_SIDE, default_text="the model's native size"
    )
    random_crop: bool = knob(False, "random instead of centre crops")
    random_flip: bool = knob(False, "random horizontal flips")
    batch_size: int = knob(32, "samples per device per micro-batch", lo=1, hi=MAX_BATCH)
    num_workers: int = knob(0, "DataLoader worker processes", lo=0, hi=MAX_WORKERS, may_change=True)
    data_dir: Path | None = knob(
        None, "Fashion-MNIST IDX folder", may_change=True, default_text="Debian's package, else a download"
    )
    allow_outside_files: bool = knob(
        False,
        "let a folder's metadata.jsonl name image files outside the folder (../x.png, absolute paths); without it "
        "such lines are skipped and counted",
    )

    def __post_init__(self):
        validate(self)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(
                f"--resolution must be a multiple of 8 between 8 and {MAX_IMAGE_SIDE}, got {self.resolution}"
            )


@dataclass(frozen=True)
class StudentConfig:
    kind: StudentKind = knob(
        StudentKind.FULL, "full UNet (+w-embedding, EMA target) or LoRA adapters", flag="--student"
    )
    lora_rank: int = knob(64, "LoRA rank", lo=1, hi=4096)
    lora_alpha: float | None = knob(None, "LoRA alpha", lo=0, open_lo=True, default_text="= rank, i.e. scale 1")
    lora_targets: tuple[str, ...] = knob(DEFAULT_LORA_TARGETS, "module names to adapt, comma-separated")
    fuse_lora: bool = knob(False, "export the LoRA merged into a full model folder")
    gradient_checkpointing: bool = knob(False, "trade compute for UNet activation memory")

    def __post_init__(self):
        validate(self)
        if not [t for t in self.lora_targets if t.strip()]:
            raise ValueError("--lora-targets takes comma-separated module names, got none")


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float | None = knob(
        None, "AdamW learning rate", lo=0, open_lo=True,
        default_text="1e-6 for a full LCD student, 1e-5 for a full LCF or tune student, 1e-4 for LoRA, as diffusers' "
        "scripts",
    )  # fmt: skip
    lr_schedule: str = knob("constant", "learning-rate schedule (cosine_floor: cosine to 10%)", choices=LR_SCHEDULES)
    lr_warmup_steps: int = knob(0, "linear warm-up steps", lo=0, hi=MAX_STEPS)
    adam_beta1: float = knob(0.9, "AdamW beta1", lo=0, hi=1, open_hi=True)
    adam_beta2: float = knob(0.999, "AdamW beta2", lo=0, hi=1, open_hi=True)
    weight_decay: float = knob(0.0, "AdamW weight decay", lo=0, flag="--adam-weight-decay")
    use_8bit_adam: bool = knob(False, "bitsandbytes AdamW8bit (GPU, saves memory)")
    max_grad_norm: float | None = knob(1.0, "gradient clipping norm", lo=0, open_lo=True, default_text="1")

    def __post_init__(self):
        validate(self)

    def resolved(self, command: str, kind: StudentKind) -> OptimConfig:
        """This config with the default learning rate of ``command`` and student ``kind`` filled in: the one rule,
        for the command line and the Python API alike."""
        if self.learning_rate is not None:
            return self
        rate = 1e-4 if kind is StudentKind.LORA else (1e-5 if command in ("finetune", "tune") else 1e-6)
        return dataclasses.replace(self, learning_rate=rate)


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int = knob(1000, "optimiser steps", lo=1, hi=MAX_STEPS, may_change=True)
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimiser step", lo=1, hi=MAX_BATCH)
    mixed_precision: str = knob("no", "autocast (the VAE stays fp32)", choices=MIXED_PRECISION)
    compile: Compile = knob(
        Compile.AUTO,
        "torch.compile the student, target and teacher (fixed shapes; kept in $LCM_CACHE/inductor). auto: on CUDA "
        "only. On a CPU, on needs a C++ compiler (without one it trains eagerly, saying so)",
    )
    seed: int = knob(0, "seed of data order, noise, t and w draws", lo=0, hi=MAX_SEED)
    checkpoint_every: int = knob(500, "steps between checkpoints", lo=1, hi=MAX_STEPS, may_change=True)
    keep_checkpoints: int = knob(2, "checkpoints kept", lo=1, hi=1_000_000, may_change=True)
    validate_every: int = knob(
        500, "steps between validation grids, and one at the end (0: no validation at all)", lo=0, hi=MAX_STEPS,
        may_change=True,
    )  # fmt: skip
    log_every: int = knob(10, "steps between log lines", lo=1, hi=MAX_STEPS, may_change=True)
    report_to: tuple[str, ...] = knob(
        ("tensorboard",),
        "experiment trackers, comma-separated, any Accelerate supports: " + ", ".join(TRACKERS),
        may_change=True,
    )
    max_bad_steps: int = knob(
        10, "stop after this many optimiser steps in a row with a non-finite loss or gradient", lo=1, hi=MAX_STEPS,
        may_change=True,
    )  # fmt: skip
    # Internal (no flag): set by the teacher's training stages and by tests.
    noise_seed: int | None = None  # seed of the generator handed to Task.loss (default: from seed and rank)
    checkpoint_dir: Path | None = None  # where the step-N folders go (default: OUT/train/checkpoints)
    write_logs: bool = True  # TensorBoard logs, train_config.json and train_history.json
    cpu: bool = False  # train on the CPU even where an accelerator is present
    label: str = "train"  # of the progress bar

    def __post_init__(self):
        validate(self)
        if unknown := [t for t in self.report_to if t not in TRACKERS]:
            raise ValueError(f"--report-to: unknown tracker {unknown[0]!r} ({', '.join(TRACKERS)})")
        if self.noise_seed is not None and not 0 <= self.noise_seed <= MAX_SEED:
            raise ValueError(f"noise_seed must lie in [0, {MAX_SEED}], got {self.noise_seed}")


@dataclass(frozen=True)
class ValidationConfig:
    prompts: tuple[str, ...] | None = knob(
        None, "prompt of the validation grid (repeatable)", flag="--validation-prompt", may_change=True, repeat=True,
        default_text="the class prompts for the embedded teacher, two stock prompts otherwise",
    )  # fmt: skip
    w: float | None = knob(
        None, "guidance w of the validation grid", lo=0, flag="--validation-w", may_change=True,
        default_text="the trained LCM's default w",
    )  # fmt: skip
    seeds: tuple[int, ...] = (0, 1)  # columns per prompt

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class RunConfig:
    """One training run: what ``lcm distill`` / ``finetune`` / ``tune`` are given, and what a run folder records."""

    command: str = (
        "distill"  # "distill" (LCD from a teacher), "finetune" (LCF of an LCM), "tune" (a teacher's own loss)
    )
    model: str | None = None  # the teacher (distill, tune) or the LCM (finetune); None: the shipped teacher
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: LCDConfig | LCFConfig | TuneConfig = None  # default: the command's (METHODS)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if self.command not in METHODS:
            raise ValueError(f"a run's command is one of {', '.join(METHODS)}, got {self.command!r}")
        if self.method is None:
            object.__setattr__(self, "method", METHODS[self.command]())
        if type(self.method) is not METHODS[self.command]:
            raise ValueError(f"lcm {self.command} takes a {METHODS[self.command].__name__}")
        if getattr(self.method, "init_student", None) and self.student.kind is not StudentKind.FULL:
            raise ValueError("--init-student starts a full student from a model folder: drop --student lora")

    def resolved(self) -> RunConfig:
        """The defaults that depend on other settings, filled in (the learning rate)."""
        return dataclasses.replace(self, optim=self.optim.resolved(self.command, self.student.kind))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RunConfig:
        """The tree a run folder (or ``--config``) recorded; one line naming ``where`` for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object of settings")
        command = data.get("command", "distill")
        if command not in METHODS:
            raise ValueError(f"{where}: command must be one of {', '.join(METHODS)}, got {command!r}")
        sections = section_classes(command)
        if unknown := sorted(set(data) - set(sections) - {"command", "model"}):
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"{where}: model must be a path or hub id, got {model!r}")
        values = {k: from_dict(c, data[k], f"{where}: {k}") for k, c in sections.items() if k in data}
        return cls(command=command, model=model, **values)


METHODS = {"distill": LCDConfig, "finetune": LCFConfig, "tune": TuneConfig}


def section_classes(command: str) -> dict[str, type]:
    """The class of each section of ``command``'s tree, by its name in :class:`RunConfig`."""
    return {
        "data": DataConfig,
        "student": StudentConfig,
        "method": METHODS[command],
        "optim": OptimConfig,
        "loop": LoopConfig,
        "validation": ValidationConfig,
    }
