"""Helpers shared by the benchmark scripts: device name, versions, commit, timers."""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def fastest(fn, device: torch.device, *, repeats: int = 3, inner: int = 1) -> float:
    """Seconds per call of fn(): fastest of ``repeats`` timings of ``inner`` back-to-back calls, after a
    warm-up call; the device is synchronised before and after every timing."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


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
