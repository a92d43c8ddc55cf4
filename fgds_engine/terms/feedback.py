"""Feedback (the paper's term): on its scheduled steps, the gradient of the classifier's criterion back
through the conditional model pass (``feedback.Feedback`` computes it in the sampler's feedback pass), pushed
at ``scale`` * ||x_t|| per sample."""

from __future__ import annotations

import torch

from .base import GuidanceTerm, StepInputs, on_schedule


class FeedbackTerm(GuidanceTerm):
    """Feedback at ``scale`` on steps ``every`` / ``window`` of ``steps`` (scale 0: its neutral value)."""

    name = "feedback"
    through_model = True

    def __init__(self, scale: float, every: int, window: tuple[int, int] | None, steps: int,
                 per_sample: bool = True):
        self.scale, self.every, self.window, self.steps = float(scale), every, window, steps
        self.per_sample = per_sample  # the criterion's: a batch-level one (repulsion) couples the batch

    def pushes(self, i: int) -> bool:
        return self.scale != 0.0 and on_schedule(i, self.every, self.window, self.steps)

    def push_stop(self, steps: int) -> int:
        return self.window[1] if self.window else self.steps

    def push(self, s: StepInputs, model_grad: torch.Tensor | None) -> torch.Tensor:
        return model_grad
