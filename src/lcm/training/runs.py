"""Building a training run from user-facing settings: model, data, task, loop. Used by ``lcm distill``,
``lcm finetune`` and ``lcm demo``; nothing here knows argparse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lcm.data.loader import batch_stream
from lcm.data.sources import collate_skip_none, open_data, parse_data_spec
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import StudentKind
from lcm.training.lcd import LCDConfig
from lcm.training.lcf import LCFConfig
from lcm.training.loop import TrainConfig, train
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

    def check(self) -> None:
        """Refuse a data string that cannot be read: a missing local path, a bad class list (hub names and URLs are
        checked when opened)."""
        parse_data_spec(self.source)


def build_dataset(cfg: DataConfig, model: LatentDiffusion):
    """A dataset of ``{"pixel_values", "caption"}`` samples at the model's resolution and channel count
    (Fashion-MNIST at its own 32×32×1)."""
    return open_data(
        cfg.source,
        resolution=cfg.resolution or model.unet.config.sample_size * model.vae_scale_factor,
        channels=model.vae.config.in_channels,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        data_dir=cfg.data_dir,
    )


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
) -> dict:
    """Distil ``teacher`` and export the student into ``loop.out``; returns the training summary.

    ``validation_w`` defaults to the distilled LCM's own default w (the middle of ``[lcd.w_min, lcd.w_max]``).
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

    return _run(teacher, task, data, loop)


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

    return _run(lcm, task, data, loop)


def _run(model_path: str | Path, make_task, data: DataConfig, loop: TrainConfig) -> dict:
    from accelerate import PartialState

    data.check()  # fail on a mistyped path before minutes of model loading
    state = PartialState()
    model = LatentDiffusion.from_pretrained(model_path, device=state.device)
    dataset = build_dataset(data, model)
    task = make_task(model)

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
        summary["skipped"] = skipped.summary()
        print(skipped.summary())
    return summary
