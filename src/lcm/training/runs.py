"""Building a training run from user-facing settings: model, data, task, loop. Used by ``lcm distill``,
``lcm finetune`` and ``lcm demo``; nothing here knows argparse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lcm.data.loader import batch_stream
from lcm.data.sources import collate_skip_none
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
        """Refuse a local path that does not exist (hub names and URLs are checked when opened)."""
        spec = self.source
        if spec == FASHION or spec.startswith(FASHION + ":") or "://" in spec or spec.startswith("pipe:"):
            return
        local = spec.startswith((".", "/", "~")) and "{" not in spec  # brace patterns are expanded later
        if local and not Path(spec).expanduser().exists():
            raise ValueError(f"--data {spec}: no such file or directory")


def build_dataset(cfg: DataConfig, model: LatentDiffusion):
    """A dataset of ``{"pixel_values", "caption"}`` samples at the model's resolution and channel count."""
    if cfg.source == FASHION or cfg.source.startswith(FASHION + ":"):
        from lcm.data.fashion_mnist import FashionCaptionDataset

        classes = None
        if ":" in cfg.source:
            try:
                classes = [int(c) for c in cfg.source.split(":", 1)[1].split(",")]
            except ValueError:
                raise ValueError(f"--data {cfg.source}: classes must be comma-separated labels 0-9") from None
        return FashionCaptionDataset("train", cfg.data_dir, classes)
    from lcm.data.sources import build_source

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
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    validation_prompts: tuple[str, ...] = (),
    validation_w: float = 6.0,
) -> dict:
    """Distil ``teacher`` and export the student into ``loop.out``; returns the training summary."""

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
) -> dict:
    """Fine-tune the LCM ``lcm`` on ``data`` without a teacher (LCF) and export it into ``loop.out``."""

    def task(model: LatentDiffusion):
        return FinetuneTask(
            model,
            student,
            lcf,
            lora,
            seed=loop.seed,
            validation_prompts=validation_prompts,
            validation_w=lcf.w,
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
