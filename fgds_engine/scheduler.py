"""Moved to ``fgds_engine.dropin_scheduler`` (this name goes in the next release)."""

from .deprecation import warn_moved

warn_moved("fgds_engine.scheduler", "fgds_engine.dropin_scheduler")

from .dropin_scheduler import *  # noqa: E402, F403
