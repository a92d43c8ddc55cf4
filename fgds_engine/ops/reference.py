"""Moved to ``fgds_engine.ops.formulas`` (this name goes in the next release)."""

from ..deprecation import warn_moved

warn_moved("fgds_engine.ops.reference", "fgds_engine.ops.formulas")

from .formulas import *  # noqa: E402, F403
