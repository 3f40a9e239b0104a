"""Building a training run from user-facing settings: model, data, task, loop. Used by ``lcm distill``,
``lcm finetune`` and ``lcm demo``; nothing here knows argparse."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lcm.data.latent_cache import LatentCache
from lcm.data.loader import batch_stream
from lcm.data.sources import collate_skip_none, open_data, parse_data_spec
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import StudentKind
from lcm.training.lcd import LCDConfig
from lcm.training.lcf import LCFConfig
from lcm.training.loop import TRAIN_DIR, TrainConfig, cpu_processes, train
from lcm.training.task import DistillTask, FinetuneTask, LoraSettings

__all__ = ["RUN_CONFIG", "DataConfig", "build_dataset", "read_run_config", "run_distillation", "run_finetune"]

FASHION = "fashion-mnist"
RUN_CONFIG = "run_config.json"  # in OUT/train: everything a run was started with, read back by --resume


@dataclass(frozen=True)
class DataConfig:
    source: str = FASHION  # "fashion-mnist[:c1,c2,…]", an imagefolder, a datasets name/path or WebDataset shards
    image_column: str | None = None
    caption_column: str | None = None
    resolution: int | None = None  # default: the model's native image size
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = 32  # per device
    num_workers: int = 0
    data_dir: Path | None = None  # Fashion-MNIST files

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be at least 0, got {self.num_workers}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")

    def check(self) -> None:
        """Refuse a data string that cannot be read: a missing local path, a bad class list (hub names and URLs are
        checked when opened)."""
        parse_data_spec(self.source)


def build_dataset(cfg: DataConfig, model: LatentDiffusion):
    """A dataset of ``{"pixel_values", "caption"}`` samples at the model's resolution and channel count
    (Fashion-MNIST at its own 32×32×1), or a latent cache written with ``model``'s own encoders."""
    dataset = open_data(
        cfg.source,
        resolution=cfg.resolution or model.unet.config.sample_size * model.vae_scale_factor,
        channels=model.vae.config.in_channels,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        data_dir=cfg.data_dir,
    )
    if isinstance(dataset, LatentCache):
        dataset.check_model(model)
    return dataset


def run_distillation(
    teacher: str | Path,
    data: DataConfig,
    lcd: LCDConfig,
    loop: TrainConfig,
    student: StudentKind = StudentKind.FULL,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    validation_prompts: tuple[str, ...] = (),
    validation_w: float | None = None,
    flags: dict[str, Any] | None = None,
) -> dict:
    """Distil ``teacher`` and export the student into ``loop.out``; returns the training summary.

    ``validation_w`` defaults to the distilled LCM's own default w (the middle of ``[lcd.w_min, lcd.w_max]``).
    ``flags`` (the command line's, if any) are recorded with the resolved settings in ``OUT/train/run_config.json``.
    """

    def task(model: LatentDiffusion):
        return DistillTask(
            model,
            student,
            lcd,
            lora,
            seed=loop.seed,
            validation_prompts=validation_prompts,
            validation_w=validation_w,
            gradient_checkpointing=gradient_checkpointing,
            provenance={"teacher": str(teacher), "data": data.source},
        )

    settings = {"command": "distill", "flags": flags, "lcd": lcd, "student": student, "lora": lora}
    return _run(teacher, task, data, loop, {**settings, "gradient_checkpointing": gradient_checkpointing})


def run_finetune(
    lcm: str | Path,
    data: DataConfig,
    lcf: LCFConfig,
    loop: TrainConfig,
    student: StudentKind = StudentKind.FULL,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    validation_prompts: tuple[str, ...] = (),
    validation_w: float | None = None,
    flags: dict[str, Any] | None = None,
) -> dict:
    """Fine-tune the LCM ``lcm`` on ``data`` without a teacher (LCF) and export it into ``loop.out``.

    Unset ``lcf`` values (w, consistency constants) are the loaded LCM's own; ``validation_w`` defaults to ``lcf.w``.
    """

    def task(model: LatentDiffusion):
        return FinetuneTask(
            model,
            student,
            lcf,
            lora,
            seed=loop.seed,
            validation_prompts=validation_prompts,
            validation_w=validation_w,
            gradient_checkpointing=gradient_checkpointing,
            provenance={"lcm": str(lcm), "data": data.source},
        )

    settings = {"command": "finetune", "flags": flags, "lcf": lcf, "student": student, "lora": lora}
    return _run(lcm, task, data, loop, {**settings, "gradient_checkpointing": gradient_checkpointing})


def _plain(value: Any) -> Any:
    """JSON-ready form of configs: dataclasses as dicts, enums as values, paths as strings."""
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _write_run_config(out: Path, record: dict[str, Any]) -> None:
    folder = out / TRAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(_plain(record), indent=2, allow_nan=False) + "\n")
    tmp.replace(folder / RUN_CONFIG)  # never half a file, whenever the process dies


def read_run_config(out: str | Path) -> dict[str, Any] | None:
    """The settings the run in ``out`` was started with (``OUT/train/run_config.json``), or None."""
    path = Path(out) / TRAIN_DIR / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it to resume with the flags you give") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a run configuration; remove it to resume with the flags you give")
    return record


def _run(model_path: str | Path, make_task, data: DataConfig, loop: TrainConfig, settings: dict[str, Any]) -> dict:
    from accelerate import PartialState

    data.check()  # fail on a mistyped path before minutes of model loading
    state = PartialState(cpu=cpu_processes(loop.cpu))
    model = LatentDiffusion.from_pretrained(model_path, device=state.device)
    dataset = build_dataset(data, model)
    task = make_task(model)
    if state.is_main_process:
        local = Path(os.fspath(model_path)).expanduser()
        resolved = str(local.resolve()) if local.exists() else (model.source or os.fspath(model_path))
        given = {"model": os.fspath(model_path), "model_resolved": resolved}
        prompts = {"validation_prompts": task.validation_prompts, "validation_w": task.validation_w}
        _write_run_config(loop.out, {**settings, **given, "data": data, "loop": loop, **prompts})

    def batches(start: int):
        return batch_stream(
            dataset,
            data.batch_size,
            collate_skip_none,
            seed=loop.seed,
            start=start,
            rank=state.process_index,
            world=state.num_processes,
            num_workers=data.num_workers,
        )

    summary = train(task, batches, loop)
    skipped = getattr(dataset, "skipped", None)
    if skipped is not None and skipped.total:
        summary["skipped"] = skipped.report()
        print(skipped.report())
    return summary
