"""Moved to ``fgds_engine.reference_loop`` (this name goes in the next release)."""

from .deprecation import warn_moved

warn_moved("fgds_engine.reference", "fgds_engine.reference_loop")

from .reference_loop import *  # noqa: E402, F403
