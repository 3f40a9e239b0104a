"""Building a distillation run from user-facing settings: model, data, task, loop. Used by ``lcm distill`` and
``lcm demo``; nothing here knows argparse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data.loader import batch_stream
from .data.sources import collate_skip_none
from .distill import LCDConfig
from .student import DEFAULT_LORA_TARGETS, StudentKind
from .tasks import DistillTask
from .teacher import LatentDiffusion
from .trainer import TrainConfig, train

__all__ = ["DataConfig", "build_dataset", "run_distillation"]

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


def build_dataset(cfg: DataConfig, model: LatentDiffusion):
    """A dataset of ``{"pixel_values", "caption"}`` samples at the model's resolution and channel count."""
    if cfg.source == FASHION or cfg.source.startswith(FASHION + ":"):
        from .data.fashion_mnist import FashionCaptionDataset

        classes = None
        if ":" in cfg.source:
            try:
                classes = [int(c) for c in cfg.source.split(":", 1)[1].split(",")]
            except ValueError:
                raise ValueError(f"--data {cfg.source}: classes must be comma-separated labels 0-9") from None
        return FashionCaptionDataset("train", cfg.data_dir, classes)
    from .data.sources import build_source

    resolution = cfg.resolution or model.unet.config.sample_size * model.vae_scale_factor
    return build_source(
        cfg.source,
        resolution=resolution,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        channels=model.vae.config.in_channels,
    )


def run_distillation(
    teacher: str | Path,
    data: DataConfig,
    lcd: LCDConfig,
    loop: TrainConfig,
    student: StudentKind = StudentKind.FULL,
    lora_rank: int = 64,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    fuse_lora: bool = False,
    gradient_checkpointing: bool = False,
    validation_prompts: tuple[str, ...] = (),
    validation_w: float = 6.0,
) -> dict:
    """Distil ``teacher`` and export the student into ``loop.out``; returns the training summary."""
    from accelerate import PartialState

    state = PartialState()
    model = LatentDiffusion.from_pretrained(teacher, device=state.device)
    dataset = build_dataset(data, model)
    task = DistillTask(
        model,
        student,
        lcd,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        validation_prompts=validation_prompts,
        validation_w=validation_w,
        gradient_checkpointing=gradient_checkpointing,
        fuse_lora=fuse_lora,
        provenance={"teacher": str(teacher), "data": data.source},
        seed=loop.seed,
    )

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
