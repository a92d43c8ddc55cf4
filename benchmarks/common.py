"""Helpers of the benchmark scripts: device name, versions, commit and the timers, from ``fgds_engine.bench``
(behind ``fgds bench``; the demos time their variants with the same interleaved timer)."""

from __future__ import annotations

from fgds_engine.bench import commit, device_name, fastest, fastest_interleaved, sync, versions

__all__ = ["commit", "device_name", "fastest", "fastest_interleaved", "sync", "versions"]
