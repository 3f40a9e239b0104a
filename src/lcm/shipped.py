"""Where the shipped models live (``lcm/assets``): the embedded teacher, flow teacher and LCM, and the classifier
behind the embedded family's offline metrics. Imports nothing heavy, so a command line can name them before torch
loads."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "default_model_path", "default_sampling_path", "embedded_classifier", "flow_teacher_path"]

ASSETS = Path(__file__).parent / "assets"


def default_model_path() -> Path:
    """The shipped embedded Fashion-MNIST teacher."""
    path = ASSETS / "fashion-teacher"
    if not (path / "unet").is_dir():
        raise ValueError(f"the shipped teacher is missing from {path}; reinstall the package or give --model")
    return path


def flow_teacher_path() -> Path:
    """The shipped embedded flow-matching teacher (an SD3-class MMDiT on the Fashion teacher's VAE)."""
    path = ASSETS / "fashion-flow-teacher"
    if not (path / "transformer").is_dir():
        raise ValueError(f"the shipped flow teacher is missing from {path}; reinstall the package or give --teacher")
    return path


def embedded_classifier(model_dir: str | Path) -> Path:
    """The classifier behind the embedded family's offline metrics: the model folder's own ``classifier/``, else the
    shipped teacher's (the flow teacher shares its VAE and data, and ships without a copy)."""
    own = Path(model_dir) / "classifier"
    return own if (own / "model.safetensors").is_file() else default_model_path() / "classifier"


def default_sampling_path() -> Path:
    """What ``lcm sample`` and ``lcm serve`` draw with when no model is given: the shipped embedded LCM
    (``assets/fashion-lcm``, see its model card), or the shipped teacher where a package lacks it."""
    path = ASSETS / "fashion-lcm"
    return path if (path / "unet").is_dir() else default_model_path()
