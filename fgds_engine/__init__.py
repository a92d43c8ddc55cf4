"""fgds-engine: fast, batched feedback-guided data synthesis (Askari-Hemmat et al., TMLR 2024).

The public names below are imported on first use (PEP 562), so that the torch-free rooms (``errors``,
``fields``, ``config``, ``plan``, ``production``) import without torch; docs/api.md lists them."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "Conditioning": "fgds_engine.conditioning",
    "FeedbackGuidedSampler": "fgds_engine.sampler",
    "FeedbackOptions": "fgds_engine.config",
    "FusedDDIMScheduler": "fgds_engine.dropin_scheduler",
    "GaussianClassStats": "fgds_engine.criteria",
    "InputError": "fgds_engine.errors",
    "LowRankClassStats": "fgds_engine.class_stats",
    "RuntimeOptions": "fgds_engine.config",
    "SampleOutput": "fgds_engine.sampler",
    "SamplerConfig": "fgds_engine.config",
    "load_class_stats": "fgds_engine.class_stats",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fgds_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
