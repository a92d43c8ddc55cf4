"""Moved to ``fgds_engine.solvers.ddim_schedule`` (this name goes in the next release)."""

from .deprecation import warn_moved

warn_moved("fgds_engine.schedule", "fgds_engine.solvers.ddim_schedule")

from .solvers.ddim_schedule import *  # noqa: E402, F403
