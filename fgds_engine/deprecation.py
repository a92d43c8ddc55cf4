"""Names that moved keep working for one release, with a ``DeprecationWarning`` saying where they went
(docs/api.md lists the public surface and what moved)."""

from __future__ import annotations

import importlib
import warnings


def moved_names(module: str, moves: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) serving each old name of ``module`` from its new home
    ("package.module:name"), with a ``DeprecationWarning`` naming it."""

    def __getattr__(name: str):
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, attr = moves[name].partition(":")
        warnings.warn(f"{module}.{name} moved to {target}.{attr or name}; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), attr or name)

    return __getattr__


def warn_moved(old: str, new: str) -> None:
    """Say once per call site that ``old`` is now ``new`` (a moved module or keyword)."""
    warnings.warn(f"{old} moved to {new}; the old name goes in the next release", DeprecationWarning,
                  stacklevel=3)
