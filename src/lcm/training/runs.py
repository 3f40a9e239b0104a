"""Building a training run from user-facing settings: model, data, task, loop. Used by ``lcm distill``,
``lcm finetune`` and ``lcm demo``; nothing here knows argparse.

Before anything is loaded, the run folder is checked: it may not be (or contain) the model or the data it reads,
and a new run refuses a folder that already holds a model or another run (:mod:`lcm.training.run_folder`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lcm.data.latent_cache import LatentCache
from lcm.data.loader import batch_stream
from lcm.data.sources import collate_skip_none, open_data, parse_data_spec
from lcm.limits import MAX_BATCH, MAX_IMAGE_SIDE, MAX_WORKERS
from lcm.locations import local_path_or_none
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import StudentKind
from lcm.training.lcd import LCDConfig
from lcm.training.lcf import LCFConfig
from lcm.training.loop import TrainConfig, cpu_processes, train
from lcm.training.run_folder import check_folder_state, own_run_folder
from lcm.training.task import DistillTask, FinetuneTask, LoraSettings

__all__ = ["DataConfig", "build_dataset", "run_distillation", "run_finetune"]

FASHION = "fashion-mnist"


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
    allow_outside: bool = False  # metadata.jsonl may name files outside the data folder

    def __post_init__(self):
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"--batch-size must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        if not 0 <= self.num_workers <= MAX_WORKERS:
            raise ValueError(f"--num-workers must be between 0 and {MAX_WORKERS}, got {self.num_workers}")
        if self.resolution is not None and not (8 <= self.resolution <= MAX_IMAGE_SIDE and self.resolution % 8 == 0):
            raise ValueError(
                f"--resolution must be a multiple of 8 between 8 and {MAX_IMAGE_SIDE}, got {self.resolution}"
            )

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
        allow_outside=cfg.allow_outside,
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
    settings = {**settings, "gradient_checkpointing": gradient_checkpointing}
    return _run(teacher, "--teacher", "teacher", task, data, loop, settings)


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
    settings = {**settings, "gradient_checkpointing": gradient_checkpointing}
    return _run(lcm, "--model", "LCM", task, data, loop, settings)


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


def _resolved(text: str | Path) -> str:
    """A local path as an absolute path (a hub id or a name as it is), for the record a resume is checked against."""
    local = local_path_or_none(os.fspath(text))
    return str(local.resolve()) if local is not None and local.exists() else os.fspath(text)


def check_out(out: Path, inputs: dict[str, tuple[str, str | Path | None]]) -> None:
    """Refuse a run folder that is, or contains, one of the ``inputs`` (``{flag: (what, path)}``): the export and the
    checkpoints would overwrite or bury what the run reads."""
    folder = out.expanduser().resolve()
    for flag, (what, given) in inputs.items():
        local = local_path_or_none(os.fspath(given)) if given is not None else None
        if local is None or not local.exists():
            continue
        path = local.resolve()
        if path == folder or folder in path.parents:
            verb = "is" if path == folder else "contains"
            raise ValueError(f"--out {out} {verb} the {what} ({flag} {given}): choose another --out")


def _check_new_run(out: Path) -> None:
    """A new run writes its model into ``out``: refuse a folder that holds files besides its training state."""
    if out.is_dir() and (others := sorted(p.name for p in out.iterdir() if p.name != "train")):
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(
            f"--out {out} already holds files ({shown}): a new run writes its model there; choose a new or empty "
            "folder, or resume the run in it with --resume latest"
        )


def _run(
    model_path: str | Path, flag: str, what: str, make_task, data: DataConfig, loop: TrainConfig, settings: dict
) -> dict:
    from accelerate import PartialState

    data.check()  # fail on a mistyped path before minutes of model loading
    check_out(loop.out, {flag: (what, model_path), "--data": ("data", data.source)})
    state = PartialState(cpu=cpu_processes(loop.cpu))
    owner = contextlib.ExitStack()

    def check() -> None:  # refuse now, before minutes of loading
        if check_folder_state(loop.train_dir, loop.train_dir / "checkpoints", loop.resume, None) is None:
            _check_new_run(loop.out)

    if state.num_processes > 1:
        check()  # read-only, alike on every rank; rank 0 takes the lock in train
    else:
        owner.enter_context(own_run_folder(loop.train_dir, " ".join(sys.argv)[:300], check))
    with owner:
        return _build_and_train(model_path, make_task, data, loop, settings, state)


def _build_and_train(model_path, make_task, data: DataConfig, loop: TrainConfig, settings: dict, state) -> dict:
    model = LatentDiffusion.from_pretrained(model_path, device=state.device)
    dataset = build_dataset(data, model)
    task = make_task(model)
    prompts = {"validation_prompts": task.validation_prompts, "validation_w": task.validation_w}
    resolved = {"model_resolved": _resolved(model_path), "data_resolved": _resolved(data.source)}
    given = {"model": os.fspath(model_path), **resolved}
    record = _plain({**settings, **given, "data": data, "loop": loop, **prompts})

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

    summary = train(task, batches, loop, record)
    skipped = getattr(dataset, "skipped", None)
    if skipped is not None and skipped.total:
        summary["skipped"] = skipped.report()
        print(skipped.report())
    return summary
