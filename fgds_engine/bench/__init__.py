"""`fgds bench`: per-sample time of the demo-loop reference against the batched engine, in the same process.

Presets (random weights: timing needs no checkpoint):
    tiny      the test models (16x16 images); small: a 12.8 M UNet, 64x64 images, ResNet-18 (CPU sizes)
    sd15-256  Stable Diffusion 1.5's UNet and VAE configs (written here) at 256 px, ResNeXt-50 at 224
    sd15-512  the same at 512 px
    sdxl-1024 SDXL's UNet (2.6 B) and VAE; sdxl-tiny: the tiny SDXL pipeline's (CPU dry run)
    sd3-medium-1024, flux-dev-1024 (and -512), pixart-sigma-1024: the transformer families' published
              configs (2.0 B, 11.9 B, 0.6 B parameters) under their own schedulers; flux-tiny: the tiny
              FLUX.1-dev-style pipeline's (CPU dry run)
Split by job: ``timing`` (timers, matmul peak, FLOPs, the machine), ``measure`` (a preset's rows),
``report`` (the table); here the options and ``main_bench`` (the JSON, rewritten after every row).
Reported per row: samples/s, seconds per sample, the ratio to the reference measured in the same run; per
preset: a component breakdown, FLOPs per sample (torch.utils.flop_counter) and the achieved TFLOP/s as a
fraction of the dense-matmul peak measured in the same run. The paper's own per-sample V100 timings (its
Table 5) could not be retrieved: they appear as a documented unknown, never as a number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ATTENTIONS, DTYPES, check_fields, option
from ..deprecation import moved_names
from ..errors import InputError
from .baselines import eager_step, smooth_image
from .measure import (
    BENCH_PRESETS,
    PAPER_V100,
    cond_for,
    memory_lines,
    model_dtypes,
    prepare_models,
    run_preset,
    step_costs,
)
from .report import format_result
from .timing import (
    commit,
    count_flops,
    device_name,
    environment,
    fastest,
    fastest_interleaved,
    fraction_of_peak,
    matmul_peak,
    sync,
    timed,
    versions,
)

__getattr__ = moved_names(__name__, {"PRESETS": "fgds_engine.bench.measure:BENCH_PRESETS"})
__all__ = ["BENCH_PRESETS", "PAPER_V100", "BenchOptions", "commit", "cond_for", "count_flops", "device_name",
           "eager_step", "environment", "fastest", "fastest_interleaved", "format_result", "fraction_of_peak",
           "main_bench", "matmul_peak", "memory_lines", "model_dtypes", "parse_batch", "prepare_models",
           "run_preset", "smooth_image", "step_costs", "sync", "timed", "versions"]


def parse_batch(text: str) -> int | str:
    """A positive integer or "auto"."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch size must be a positive integer or 'auto', got {text!r}")
    return int(text)


@dataclass(frozen=True)
class BenchOptions:
    """The flags of ``fgds bench``."""

    preset: str = option("tiny", "model set: " + " | ".join(BENCH_PRESETS))
    batches: tuple[int | str, ...] = option(
        (1, 8, 32), "engine batch sizes; auto: the largest batch (and feedback chunk) that fits the device's "
        "free memory (a fixed 8 on the CPU)", parse=parse_batch)
    steps: int = option(30, "sampling steps", low=1)
    scheduler: str | None = option(
        None, "scheduler of the reference and the engine: ddim (default; the flow presets: their own) | "
        "dpmpp-2m | unipc | euler | flow-euler | ... (fgds generate --help) or a diffusers class name")
    feedback_every: tuple[int, ...] = option((5, 1), "feedback frequencies", low=1)
    repeats: int = option(3, "timed calls per row (fastest and median reported)", low=1)
    warmup: int = option(1, "untimed calls before a row's timings", low=0)
    max_seconds: float | None = option(
        None, "time budget: rows not started by then are recorded as skipped", low=0.0)
    probe_memory: bool = option(False, "record the memory lines of a CFG step, a feedback step and the final "
                                "decode (probes at batches 1 and 2; on the CPU: live tensor bytes)")
    device: str | None = option(None, "cuda | cpu (default: cuda if available)")
    dtype: str | None = option(None, "model dtype: float32 | float16 | bfloat16 (default: float16 on CUDA)")
    attention: str = option("sdpa", "sdpa | xformers (CUDA) | keep (the models' own processors)")
    channels_last: bool = option(False, "channels-last memory format")
    json: str | None = option(None, "output file (default: benchmarks/results/bench-<preset>-<device>.json)")

    def __post_init__(self):
        check_fields(self)
        if self.preset not in BENCH_PRESETS:
            raise InputError(f"preset must be one of {tuple(BENCH_PRESETS)}, got {self.preset!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise InputError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


def main_bench(preset: str, *, batches, steps, feedback_every, repeats, device, dtype, attention,
               channels_last, json_path, warmup: int = 1, max_seconds: float | None = None,
               probe_memory: bool = False, scheduler: str | None = None) -> dict:
    """Run a preset, rewriting its JSON after every row (an interrupted run keeps what it measured)."""
    import json
    from pathlib import Path

    device = torch.device(device)
    env = environment(device)
    tag = "" if scheduler in (None, "ddim") else f"-{scheduler}"
    path = Path(json_path or f"benchmarks/results/bench-{preset}{tag}-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    timing = f"fastest (and median) of {repeats} after {warmup} warm-up call(s)"
    state = {"result": {"preset": preset, "runs": []}}

    def write(result: dict) -> None:
        state["result"] = result
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**env, "timing": timing, **result}, indent=2))
        tmp.replace(path)

    print(f"device: {env['device']}   torch {env['torch']}   triton {env['triton']}   commit {env['commit']}")
    try:
        result = run_preset(preset, batches=batches, steps=steps, feedback_every=feedback_every,
                            repeats=repeats, warmup=warmup, device=device, dtype=dtype, attention=attention,
                            channels_last=channels_last, max_seconds=max_seconds, probe_memory=probe_memory,
                            scheduler=scheduler, write=write)
    except KeyboardInterrupt:
        result = {**state["result"], "complete": False, "interrupted": True}
        write(result)
        print(format_result(result))
        print(f"interrupted: wrote what was measured to {path}")
        raise
    print(format_result(result))
    print(f"wrote {path}")
    return result
