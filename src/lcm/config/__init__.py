"""The run-config tree: every setting of a training run, with its default, range and help, in one place
(:mod:`lcm.config.run`); the knob machinery behind it (:mod:`lcm.config.knobs`); the named recipes of ``lcm demo``
and the research scripts as overrides of it (:mod:`lcm.config.recipes`)."""

from lcm.config.knobs import differences, override
from lcm.config.run import (
    DEFAULT_LORA_TARGETS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    TRACKERS,
    Compile,
    DataConfig,
    LCDConfig,
    LCFConfig,
    LoopConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    StudentKind,
    ValidationConfig,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "TRACKERS",
    "Compile",
    "DataConfig",
    "LCDConfig",
    "LCFConfig",
    "LoopConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "StudentKind",
    "ValidationConfig",
    "differences",
    "override",
]
