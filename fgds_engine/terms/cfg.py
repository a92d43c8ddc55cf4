"""Classifier-free guidance (Ho and Salimans, 2022) and its interval (Kynkaanniemi et al., NeurIPS 2024):
the term that chooses the passes. eps = eps_u + w (eps_c - eps_u) is the fused step's (``ops``); this term
says which steps run the unconditional half: every step, or those whose model input's noise level
sigma_t = sqrt((1 - a_t) / a_t) satisfies lo < sigma_t <= hi (elsewhere the conditional pass alone)."""

from __future__ import annotations

from .base import Batch, GuidanceTerm


class ClassifierFreeGuidance(GuidanceTerm):
    """CFG at scale w (> 1; at w <= 1, its neutral value, no step runs the unconditional half), on the noise
    levels of ``interval`` (None: every step)."""

    name = "cfg"
    needs_uncond = True

    def __init__(self, scale: float, interval: tuple[float, float] | None = None):
        self.scale, self.interval = float(scale), interval

    def wants_uncond(self, i: int, batch: Batch) -> bool:
        if self.scale <= 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo < batch.run.sigmas_host[i] <= hi
