"""Helpers of the benchmark scripts. Device name, versions, commit and the timer live in
``fgds_engine.bench`` (behind ``fgds bench``); only the interleaved timer is specific to the scripts."""

from __future__ import annotations

import time

import torch

from fgds_engine.bench import commit, device_name, fastest, sync, versions

__all__ = ["commit", "device_name", "fastest", "fastest_interleaved", "sync", "versions"]


def fastest_interleaved(calls: dict, device: torch.device, *, repeats: int = 5, inner: int = 1) -> dict:
    """Seconds per call of each fn in ``calls``, timed in alternation (round r times every fn once), keeping
    each one's fastest round: drift in a shared machine's speed then hits every row alike."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best
