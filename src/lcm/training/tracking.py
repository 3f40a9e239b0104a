"""Experiment trackers of the training loop (``--report-to``): which ones, what they are sent."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = ["flat_config", "log_images", "trackers"]


def trackers(report_to: tuple[str, ...]) -> list[str]:
    """The trackers of ``--report-to``; one that is not installed is refused (Accelerate would drop it silently)."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for tracker in report_to:
        if tracker not in available:
            raise ValueError(f"--report-to {tracker}: the {tracker} package is not installed (pip install {tracker})")
    return list(report_to)


def log_images(accelerator, images: dict, step: int) -> None:
    """Send a validation grid to every tracker that takes images (TensorBoard, Weights & Biases, …)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(images, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images(images, step=step)


def flat_config(*sections) -> dict[str, Any]:
    """Config sections as trackers take hyperparameters: one flat dict of numbers, strings and booleans."""

    def flat(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return ",".join(map(str, v))
        if isinstance(v, Enum):
            return v.value
        return str(v) if isinstance(v, Path) or v is None else v

    return {k: flat(v) for section in sections for k, v in asdict(section).items()}
