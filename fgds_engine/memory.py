"""Memory-aware batching: the largest batch, and feedback micro-batch, that fit the device's free memory.

A sampling step's peak memory is close to linear in the batch: fixed buffers plus a per-sample cost (the CFG
pass holds 2B UNet activations without gradient; the feedback pass keeps the UNet, decoder and classifier
activations of its samples for the backward, the larger cost: ~0.95 GiB per sample at 256 px in fp16 for
SD 1.5 + ResNeXt-50, ~3.7 GiB at 512 px). ``probe`` measures both passes at batches 1 and 2 on the device
(peak allocated bytes above the baseline), ``choose`` fits the two lines into the free memory with headroom
for the allocator and CUDA-graph pools. On the CPU nothing is measured: a fixed, sensible batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

CPU_BATCH = 8
MAX_BATCH = 64
HEADROOM = 0.8  # of the free memory: the allocator's fragmentation, graph pools, the decode at the end


@dataclass(frozen=True)
class BatchPlan:
    """batch: samples per sampler call; chunk: feedback micro-batch (None: the whole batch); why: one line."""

    batch: int
    chunk: int | None
    why: str

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

    def fits(self, budget: float) -> int:
        """The largest batch whose peak stays within ``budget`` bytes (0 if not even one)."""
        return max(int((budget - self.fixed) // self.per_sample), 0)


def choose(
    free_bytes: float, cfg: Line, feedback: Line, *, max_batch: int = MAX_BATCH, headroom: float = HEADROOM
) -> BatchPlan:
    """The batch from the CFG pass's line, the feedback chunk from the feedback pass's line."""
    budget = free_bytes * headroom
    batch = min(cfg.fits(budget), max_batch)
    if batch >= 16:
        batch -= batch % 8  # multiples of 8 suit the tensor cores
    chunk = feedback.fits(budget)
    if batch < 1 or chunk < 1:
        raise RuntimeError(
            f"not even one sample fits: {free_bytes / 2**30:.1f} GiB free, a CFG step needs "
            f"{(cfg.fixed + cfg.per_sample) / 2**30:.2f} GiB and a feedback step "
            f"{(feedback.fixed + feedback.per_sample) / 2**30:.2f} GiB"
        )
    gib = 2**30
    why = (
        f"{free_bytes / gib:.1f} GiB free x {headroom:.0%}; per sample {cfg.per_sample / gib:.2f} GiB for a "
        f"CFG step, {feedback.per_sample / gib:.2f} GiB for a feedback step"
    )
    return BatchPlan(batch, None if chunk >= batch else chunk, why)


def probe(sampler, cond_fn: Callable[[int], object], batch: int) -> tuple[float, float]:
    """Peak bytes (above the baseline) of one CFG pass and one feedback pass at ``batch`` on a CUDA device."""
    dev = sampler.device
    x = torch.randn(batch, *sampler.latent_shape, device=dev, dtype=sampler.dtype)
    cond = cond_fn(batch)
    uncond = cond.unconditional() if sampler.config.use_cfg else None
    t = sampler.schedule.timesteps[:1].to(dev)[0]
    a_t = sampler.schedule.alphas(0)[0].to(dev)
    labels = torch.arange(batch, device=dev) % sampler.classifier.num_classes
    peaks = []
    for run in (
        lambda: sampler.cfg_pass(x, t, cond, uncond),
        lambda: sampler.feedback_pass(x, t, a_t, cond, uncond, labels, chunk=None),
    ):
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with sampler.frozen():
            run()
        torch.cuda.synchronize(dev)
        peaks.append(float(torch.cuda.max_memory_allocated(dev) - base))
    return peaks[0], peaks[1]


def dummy_conditioning(sampler, batch: int):
    """Random conditioning of the UNet's shapes (text length from its pipeline's tokenizer, else 77): what a
    memory probe needs, whatever the pipeline's encoders are."""
    from .conditioning import Conditioning

    cfg, dev = sampler.unet.config, sampler.device
    pipe = getattr(sampler, "pipe", None)
    length = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77)
    length = length if isinstance(length, int) and length < 1024 else 77
    pe = torch.randn(batch, length, cfg.cross_attention_dim)
    cl = None
    if getattr(cfg, "class_embed_type", None) == "projection":
        cl = torch.randn(batch, cfg.projection_class_embeddings_input_dim)
    elif getattr(cfg, "num_class_embeds", None):
        cl = torch.zeros(batch, dtype=torch.long)
    return Conditioning(pe, torch.zeros_like(pe), cl, None if cl is None else torch.zeros_like(cl)).to(
        dev, sampler.dtype
    )


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
        (c1, f1), (c2, f2) = probe_fn(sampler, cond_fn, 1), probe_fn(sampler, cond_fn, 2)
        plan = choose(
            free_fn(sampler.device), Line.through(c1, c2), Line.through(f1, f2), max_batch=max_batch
        )
    chunk = "the whole batch" if plan.chunk is None else f"{plan.chunk} samples"
    log(f"batch size auto: {plan.batch}, feedback gradient in chunks of {chunk} ({plan.why})")
    return plan
