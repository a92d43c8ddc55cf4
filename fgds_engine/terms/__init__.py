"""Guidance terms: each technique one object at the step's hook points (``base.GuidanceTerm``).

    cfg.py        ClassifierFreeGuidance   passes: the unconditional half, on every step or an interval
    cads.py       CADS                     conditioning: the conditional half annealed per step
    feedback.py   FeedbackTerm             push: the criterion's gradient through the model pass
    repulsion.py  Repulsion                push: same-label samples of a batch apart (batch-level)
    skip_layers.py SkipLayerGuidance      output: away from a pass with layers skipped (SD3's SLG)

``from_config`` builds the list a ``SamplerConfig`` describes (only terms away from their neutral value);
``Terms`` runs a list at the hook points for the sampler's loop. A term of your own is a ``GuidanceTerm``
subclass passed as ``FeedbackGuidedSampler(..., terms=[...])`` (docs/guidance.md), with its row in the
term contract test (tests/test_terms.py).
"""

from __future__ import annotations

import contextlib

import torch

from ..conditioning import Conditioning
from ..deprecation import warn_moved
from .base import Batch, GuidanceTerm, StepInputs, on_schedule
from .cads import CADS
from .cfg import ClassifierFreeGuidance
from .feedback import FeedbackTerm
from .repulsion import Repulsion
from .skip_layers import SkipLayerGuidance

__all__ = ["CADS", "Batch", "ClassifierFreeGuidance", "FeedbackTerm", "GuidanceTerm", "Repulsion",
           "SkipLayerGuidance", "StepInputs", "Terms", "from_config", "on_schedule"]


def from_config(config, *, per_sample_criterion: bool = True, guidance_embedded: bool = False
                ) -> list[GuidanceTerm]:
    """The terms a ``SamplerConfig`` asks for, in the order their pushes combine (feedback, then repulsion);
    a term at its neutral value is left out. ``guidance_embedded``: the denoiser takes the guidance scale as
    an input (FLUX.1-dev): its CFG term is ``true_cfg_scale``'s (none at 1, the default)."""
    c, steps = config, config.num_inference_steps
    terms: list[GuidanceTerm] = []
    cfg_scale = c.true_cfg_scale if guidance_embedded else c.guidance_scale
    if cfg_scale > 1.0:
        terms.append(ClassifierFreeGuidance(cfg_scale, c.cfg_interval))
    if c.cads is not None:
        terms.append(CADS(c.cads, c.cads_noise, c.cads_rescale))
    if c.skip_layer_guidance is not None:
        terms.append(SkipLayerGuidance(c.skip_layer_guidance, c.skip_layer_guidance_scale,
                                       c.skip_layer_guidance_start, c.skip_layer_guidance_stop, steps))
    if c.feedback_scale != 0.0:
        terms.append(FeedbackTerm(c.feedback_scale, c.feedback_every, c.feedback_window, steps,
                                  per_sample=per_sample_criterion))
    if c.repulsion_scale > 0:
        terms.append(Repulsion(c.repulsion_scale, c.feedback_every, c.feedback_window, steps))
    return terms


class Terms:
    """A sampler's terms at the hook points, in order. At most one term pushes through the model pass."""

    def __init__(self, terms: list[GuidanceTerm]):
        self.all = tuple(terms)
        names = [t.name for t in self.all]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance term names must be unique, got {', '.join(names)}")
        if sum(t.through_model for t in self.all) > 1:
            raise ValueError("at most one guidance term may push through the model pass")
        # the term that runs the unconditional half (classifier-free guidance), or None
        self.unconditional = next((t for t in self.all if t.needs_uncond), None)
        self.through_model = next((t for t in self.all if t.through_model), None)

    @property
    def cfg(self) -> GuidanceTerm | None:
        """The old name of ``unconditional`` (``cfg`` named the guidance term and any configuration)."""
        warn_moved("Terms.cfg", "Terms.unconditional")
        return self.unconditional

    def __iter__(self):
        return iter(self.all)

    def get(self, name: str) -> GuidanceTerm | None:
        return next((t for t in self.all if t.name == name), None)

    @property
    def per_sample(self) -> bool:
        """Whether a sample's result does not depend on its batch under every term."""
        return all(t.per_sample for t in self.all)

    def scales(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Each term's scale as a [1] fp32 device tensor (a graphed step reads them from static buffers)."""
        return {t.name: torch.full((1,), t.scale, device=device) for t in self.all}

    def start(self, cond: Conditioning, unet, stack: contextlib.ExitStack) -> Conditioning:
        """The batch's conditioning after every term's ``prepare``; their contexts entered on ``stack``."""
        for t in self.all:
            stack.enter_context(t.context(cond, unet))
        for t in self.all:
            cond = t.prepare(cond, unet)
        return cond

    def conditioning(self, i: int, cond: Conditioning, batch: Batch) -> Conditioning:
        for t in self.all:
            cond = t.conditioning(i, cond, batch)
        return cond

    def wants_uncond(self, i: int, batch: Batch) -> bool:
        return any(t.wants_uncond(i, batch) for t in self.all)

    def adjusting(self, i: int, batch: Batch) -> tuple[GuidanceTerm, ...]:
        """The terms that adjust the guided model output on step i (host side: names the step's graph)."""
        return tuple(t for t in self.all if t.adjusts(i, batch))

    def pushing(self, i: int) -> tuple[GuidanceTerm, ...]:
        """The terms scheduled to push on step i (before any push moves off an undefined step: ``plan``)."""
        return tuple(t for t in self.all if t.pushes(i))

    def plan(self, defined: list[bool]) -> list[tuple[GuidanceTerm, ...]]:
        """Per step, the terms that push on a run whose pushes are defined where ``defined[i]`` (host side:
        names the step's graph). A term whose every push is lost (no defined step in its window after
        them) is refused in one line: the run would be the unguided one without a word."""
        steps = {t.name: t.push_steps(defined) for t in self.all}
        for t in self.all:
            if any(t.pushes(i) for i in range(len(defined))) and not any(steps[t.name]):
                undefined = [i for i, ok in enumerate(defined) if not ok]
                raise ValueError(f"{t.name} never pushes on this schedule: its steps fall where a push is "
                                 f"undefined (steps {undefined}: pure noise, or a flow level above 0.99) "
                                 "with no defined step after them in its window; schedule it later or run "
                                 "more steps")
        return [tuple(t for t in self.all if steps[t.name][i]) for i in range(len(defined))]
