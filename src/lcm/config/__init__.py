"""The run-config tree: every setting of a training run, with its default, range and help, in one place
(:mod:`lcm.config.run`, its method section :mod:`lcm.config.method`); the knob machinery behind it
(:mod:`lcm.config.knobs`); the named recipes of ``lcm demo`` and the research scripts as overrides of it
(:mod:`lcm.config.recipes`)."""

from lcm.config import method, run
from lcm.config.knobs import differences, override
from lcm.config.method import *  # noqa: F403 (the method configs and their choices, as method.__all__ names them)
from lcm.config.run import *  # noqa: F403 (the sections and their choices, as run.__all__ names them)

__all__ = [*run.__all__, *method.__all__, "differences", "override"]
