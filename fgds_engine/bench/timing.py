"""Timing and the machine: synchronised timers (fastest of repeats, interleaved rounds), the dense-matmul
peak, FLOP counts, and the device / versions / commit every result records."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, inner: int = 1, warmup: int = 1) -> tuple[float, float]:
    """(fastest, median) seconds per call of fn() over ``repeats`` timings of ``inner`` back-to-back calls,
    after ``warmup`` untimed calls; the device is synchronised before and after every timing."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return min(times), statistics.median(times)


def fastest(fn, device: torch.device, repeats: int = 1, inner: int = 1) -> float:
    """Seconds per call of fn(): the fastest of ``repeats`` timings after one untimed warm-up."""
    return timed(fn, device, repeats, inner)[0]


def fastest_interleaved(calls: dict, device: torch.device, *, repeats: int = 5, inner: int = 1,
                        warmup: bool = True) -> dict:
    """Seconds per call of each fn in ``calls``, timed in alternation (round r times every fn once), keeping
    each one's fastest round: drift in a shared machine's speed then hits every row alike. ``warmup``: one
    untimed call of each first (False: the caller warmed them up)."""
    if warmup:
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


def matmul_peak(device: torch.device, dtype: torch.dtype, *, cpu_call_s: float = 1.0) -> float:
    """Measured dense-matmul FLOP/s in ``dtype``: the best over several sizes and repeats.

    One size underestimates (the CPU's best blocking, a GPU's clocks ramping up): seen, an engine at 106% of a
    single-size probe. GPU: n = 4096, 8192, 12288, repeats sized in FLOPs. CPU: 256 to 2048, repeats sized by
    a first timed call (about 0.2 s a timing), and no size whose one call would take over ``cpu_call_s``:
    half precision on a CPU without fp16 vector units runs 5-20x slower than float32, and a fixed FLOP count
    made the probe alone take minutes there (float32 on 2 cores still reaches n = 2048).
    """
    cuda = device.type == "cuda"
    sizes = (4096, 8192, 12288) if cuda else (256, 512, 1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        if cuda:
            reps = max(1, int(2e12 // (2 * n**3)))
        else:
            reps = max(1, int(0.2 / max(fastest(lambda a=a, b=b: a @ b, device), 1e-6)))
        sec = fastest(lambda a=a, b=b, r=reps: [a @ b for _ in range(r)], device, repeats=3) / reps
        best = max(best, 2 * n**3 / sec)
        del a, b
        if not cuda and 8 * sec > cpu_call_s:  # the next size's call: 8x the FLOPs
            break
    return best


def fraction_of_peak(flops_per_s: float, peak: float) -> dict:
    """The achieved fraction of the measured peak; above 100% the probe failed, and that is what is said."""
    frac = flops_per_s / peak
    if frac > 1.0:
        return {"fraction_of_peak": None,
                "peak_note": f"measurement error: {frac:.0%} of the measured matmul peak (the probe "
                             "underestimates)"}
    return {"fraction_of_peak": frac}


def count_flops(fn) -> int | None:
    """FLOPs of ``fn()`` (matmuls, convolutions, attention; forward and backward) by torch's flop formulas.

    A dispatch mode rather than FlopCounterMode: the latter's module hooks reject ``autograd.grad`` on a
    leaf, which the feedback step uses. None where this torch lacks the formulas.
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
    except ImportError:
        return None

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                _Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with _Count():
        fn()
    return _Count.total


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo) and the vector unit torch's kernels use on it (AVX2,
    AVX512, ...): float results, and so the demos' numbers, can differ between machines that differ in it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def commit() -> str | None:
    """The checkout's short commit hash (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    """torch, triton (None if absent) and Python versions, and the CPU (``cpu_name``)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0],
            "cpu": cpu_name()}


def environment(device: torch.device) -> dict:
    return {"device": device_name(device), **versions(), "commit": commit()}
