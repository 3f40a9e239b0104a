"""The run-config tree: every setting of a training run, with its default, range and help, in one place
(:mod:`lcm.config.run`); the knob machinery behind it (:mod:`lcm.config.knobs`); the named recipes of ``lcm demo``
and the research scripts as overrides of it (:mod:`lcm.config.recipes`)."""

from lcm.config import run
from lcm.config.knobs import differences, override
from lcm.config.run import *  # noqa: F403 (the sections and their choices, as run.__all__ names them)

__all__ = [*run.__all__, "differences", "override"]
