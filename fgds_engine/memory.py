"""Memory-aware batching: the largest batch, and feedback micro-batch, that fit the device's free memory.

What stays resident while a batch is sampled on a GPU is budgeted as a sum: the CUDA graph of the CFG step
keeps its peak at the batch B, the graph of the feedback step keeps its peak at the feedback chunk c, and
the final decode + score runs beside both, in chunks of c:

    free x HEADROOM >= cfg(B) + feedback(c) + final(c)

(graphs.py shares one pool between the graphs, so the sum is an upper bound.) Each pass's peak is close to
linear in its batch (``Line``: fixed buffers plus a per-sample cost; the CFG pass holds 2B UNet activations
without gradient, the feedback pass the UNet, decoder and classifier activations of its samples for the
backward, the larger cost). ``probe`` measures the three at batches 1 and 2: on CUDA the allocator's peak
above the baseline, on the CPU the peak of live tensor bytes (``LiveBytes``: what a device would allocate,
without its allocator's rounding; the harvest's dry run records it for SD 1.5 at 256 px). ``choose`` takes
the largest batch whose CFG pool fits beside a feedback chunk of 8, then the largest chunk that fits beside
that batch. HEADROOM keeps a fifth for fragmentation, static buffers and the lines' extrapolation. On the
CPU nothing is planned: a fixed, sensible batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_BATCH = 8
MAX_BATCH = 64
MIN_CHUNK = 8  # the feedback step is most of the time: never starve its chunk to grow the batch
HEADROOM = 0.8  # of the free memory: the allocator's fragmentation, static buffers, the lines' extrapolation
GIB = 2**30


@dataclass(frozen=True)
class BatchPlan:
    """batch: samples per sampler call; chunk: feedback (and final decode) micro-batch (None: the whole
    batch); why: one line; lines: the measured lines in GiB (fixed, per sample) of each pass, if measured."""

    batch: int
    chunk: int | None
    why: str
    lines: dict | None = field(default=None, compare=False)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Line:
    """Peak bytes of a pass as ``fixed + per_sample * batch``."""

    fixed: float
    per_sample: float

    @classmethod
    def through(cls, at1: float, at2: float) -> Line:
        per = max(at2 - at1, 1.0)
        return cls(max(at1 - per, 0.0), per)

    def at(self, batch: int) -> float:
        """Bytes at ``batch`` samples."""
        return self.fixed + self.per_sample * batch

    def fits(self, budget: float) -> int:
        """The largest batch whose peak stays within ``budget`` bytes (0 if not even one)."""
        if self.per_sample <= 0:
            return 2**31 if budget >= self.fixed else 0
        return max(int((budget - self.fixed) // self.per_sample), 0)

    def __add__(self, other: Line) -> Line:
        return Line(self.fixed + other.fixed, self.per_sample + other.per_sample)

    def gib(self) -> list[float]:
        """[fixed, per sample] in GiB."""
        return [round(self.fixed / GIB, 6), round(self.per_sample / GIB, 6)]


def resident(cfg: Line, feedback: Line, final: Line, batch: int, chunk: int | None) -> float:
    """Bytes resident at the end of sampling a batch: both graph pools and the final decode beside them."""
    c = batch if chunk is None else chunk
    return cfg.at(batch) + feedback.at(c) + final.at(c)


def choose(
    free_bytes: float, cfg: Line, feedback: Line, final: Line, *, max_batch: int = MAX_BATCH,
    headroom: float = HEADROOM,
) -> BatchPlan:
    """The largest batch whose CFG pool fits beside a feedback chunk of ``MIN_CHUNK`` samples and their
    decode, then the largest feedback chunk that fits beside that batch's CFG pool (the budget is their sum,
    module docstring); where not even that fits, chunk = batch."""
    budget = free_bytes * headroom
    per_chunk = feedback + final
    batch = min(cfg.fits(budget - per_chunk.at(MIN_CHUNK)), max_batch)
    if batch < MIN_CHUNK:  # tight: chunk = batch, the largest whose three parts fit together
        batch = min((cfg + per_chunk).fits(budget), max_batch)
    if batch >= 16:
        batch -= batch % 8  # multiples of 8 suit the tensor cores
    chunk = min(per_chunk.fits(budget - cfg.at(batch)), batch) if batch >= 1 else 0
    if batch < 1 or chunk < 1:
        raise RuntimeError(
            f"not even one sample fits: {free_bytes / GIB:.1f} GiB free, a CFG step needs "
            f"{cfg.at(1) / GIB:.2f} GiB, a feedback step {feedback.at(1) / GIB:.2f} GiB and the final "
            f"decode {final.at(1) / GIB:.2f} GiB"
        )
    total = resident(cfg, feedback, final, batch, chunk)
    why = (
        f"{free_bytes / GIB:.1f} GiB free x {headroom:.0%}: CFG graph {cfg.at(batch) / GIB:.1f} GiB at "
        f"{batch} + feedback graph {feedback.at(chunk) / GIB:.1f} GiB at {chunk} + final decode "
        f"{final.at(chunk) / GIB:.1f} GiB at {chunk} = {total / GIB:.1f} GiB"
    )
    lines = {"cfg": cfg.gib(), "feedback": feedback.gib(), "final": final.gib()}
    return BatchPlan(batch, None if chunk >= batch else chunk, why, lines)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created by the ops run under it (any device): what a device's
    allocator would hold at most, without its rounding. Storages that existed before are not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._sizes = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                # a new storage: not an input's (views, in-place and out= results share their input's)
                if n and key not in self._sizes and key not in inputs:
                    self._sizes[key] = n
                    self.live += n
                    weakref.finalize(st, self._free, key)  # fires when the storage itself is freed
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)


def peak_bytes(run: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated by ``run()`` above what was allocated before: the CUDA allocator's statistics on
    a GPU, ``LiveBytes`` elsewhere."""
    if device.type != "cuda":
        with LiveBytes() as live:
            run()
        return float(live.peak)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def probe(sampler, cond_fn: Callable[[int], object], batch: int) -> tuple[float, float, float]:
    """Peak bytes (above the baseline) of one CFG pass, one feedback pass and the final decode + score at
    ``batch`` (``peak_bytes``: the CUDA allocator's, or live tensor bytes on the CPU)."""
    dev = sampler.device
    x = torch.randn(batch, *sampler.latent_shape, device=dev, dtype=sampler.latent_dtype)
    cond = cond_fn(batch)
    uncond = cond.unconditional() if sampler.terms.unconditional is not None else None
    t, a_t = sampler.solver.first_inputs(dev)
    labels = torch.arange(batch, device=dev) % sampler.classifier.num_classes
    nan = torch.zeros(batch, dtype=torch.bool, device=dev)
    passes = (
        lambda: sampler.cfg_pass(x, t, cond, uncond),
        lambda: sampler.feedback_pass(x, t, a_t, cond, uncond, labels, chunk=None),
        lambda: sampler.finish(x, labels, nan, chunk=None),
    )
    with sampler.frozen():
        return tuple(peak_bytes(run, dev) for run in passes)


def measure_lines(sampler, cond_fn: Callable[[int], object], probe_fn=probe) -> tuple[Line, Line, Line]:
    """The CFG, feedback and final lines through probes at batches 1 and 2."""
    at1, at2 = probe_fn(sampler, cond_fn, 1), probe_fn(sampler, cond_fn, 2)
    return tuple(Line.through(a, b) for a, b in zip(at1, at2))


def dummy_conditioning(sampler, batch: int):
    """Random conditioning of the denoiser's shapes (text length as its pipeline encodes, else 77): what a
    memory probe needs, whatever the pipeline's encoders are."""
    from .conditioning import random_conditioning

    adapter = getattr(sampler, "adapter", None)
    length = 77 if adapter is None else adapter.text_length()
    return random_conditioning(sampler.unet.config, batch, length).to(sampler.device, sampler.dtype)


def free_memory(device: torch.device) -> float:
    """Bytes free on the device, counting what torch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def plan_batch(
    sampler,
    cond_fn: Callable[[int], object],
    *,
    max_batch: int = MAX_BATCH,
    probe_fn=probe,
    free_fn=free_memory,
    log=print,
) -> BatchPlan:
    """The batch and feedback chunk for ``sampler`` on its device, said in one line.

    Args:
        sampler: a ``FeedbackGuidedSampler`` (its models on the device, in the run's dtype).
        cond_fn: batch -> ``Conditioning`` of that many rows, on the device.
        probe_fn, free_fn: the measurements (injectable for tests).
    """
    if sampler.device.type != "cuda":
        plan = BatchPlan(CPU_BATCH, None, f"fixed on {sampler.device.type} (no device memory to measure)")
    else:
        lines = measure_lines(sampler, cond_fn, probe_fn)
        plan = choose(free_fn(sampler.device), *lines, max_batch=max_batch)
    chunk = "the whole batch" if plan.chunk is None else f"{plan.chunk} samples"
    log(f"batch size auto: {plan.batch}, feedback gradient and final decode in chunks of {chunk} "
        f"({plan.why})")
    return plan
