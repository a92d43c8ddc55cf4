"""The demos' sampling helpers, shared by the runner, the generator gate and the experiments: the engine for
one variant (``variant_sampler``), the production loop's call over it (``label_sample_fn``) and what a
variant's samples depend on (``sample_key``, the cache key)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..criteria import get_criterion
from ..production import GeneratedBatch
from .config import NUM_CLASSES, DemoConfig, Variant


def objective_key(cfg: DemoConfig) -> dict:
    """The generator's objective in a cache key, only where it is not the DDPM one (the keys of the runs that
    predate it stay the same, so their cached results still reproduce)."""
    return {} if cfg.objective == "ddpm" else {"objective": cfg.objective}


def sample_key(cfg: DemoConfig) -> dict:
    """What the samples of a variant depend on, besides the variant (the list of variants run is not)."""
    # how it runs, not what it samples
    how = ("scales", "threads", "timing_repeats", "solvers", "coverage", "recipes", "budget_caps")
    key = {k: v for k, v in asdict(cfg).items() if k not in how}
    if cfg.objective == "ddpm":
        key.pop("objective")
    if cfg.clip_sample or cfg.objective == "flow":  # the default (keys made before the field), or no DDIM
        key.pop("clip_sample")
    return key


def variant_sampler(unet, sched, classifier, cfg: DemoConfig, variant: Variant, stats):
    """The engine for one variant: CFG on the null class, feedback from the biased real-only classifier."""
    from ..sampler import FeedbackGuidedSampler, SamplerConfig

    feedback = variant.criterion is not None
    steps = variant.steps or cfg.sample_steps
    w = cfg.guidance_scale if variant.guidance_scale is None else variant.guidance_scale
    sc = SamplerConfig(num_inference_steps=steps, scheduler=variant.scheduler, guidance_scale=w,
                       cfg_interval=variant.cfg_interval, cads=variant.cads,
                       repulsion_scale=variant.repulsion_scale,
                       feedback_scale=variant.scale if feedback else 0.0,
                       criterion=variant.criterion if feedback else "entropy",
                       feedback_every=cfg.feedback_every_for(steps), feedback_mode=variant.feedback_mode,
                       grad_path=variant.grad_path, embedding_dropout=0.0,
                       classifier_mean=(0.5,) * cfg.channels, classifier_std=(0.5,) * cfg.channels)
    needs_stats = feedback and get_criterion(variant.criterion).needs_stats
    return FeedbackGuidedSampler(unet, None, classifier, sched, sc, stats=stats if needs_stats else None)


def label_sample_fn(sampler):
    """The production loop's sampler call: class-label conditioning, uint8 images out (all channels)."""
    from ..conditioning import Conditioning

    def sample_fn(prompts, exemplars, labels, seeds):
        y = torch.tensor(labels)
        cond = Conditioning(class_labels=y, negative_class_labels=torch.full_like(y, NUM_CLASSES))
        out = sampler.sample(cond, y, seeds)
        img = torch.nan_to_num(out.images, nan=0.0)
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8)
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.permute(0, 2, 3, 1)
        return GeneratedBatch(arr.numpy(), out.criterion.tolist(), out.nan.tolist())

    return sample_fn
