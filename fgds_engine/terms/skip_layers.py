"""Skip-layer guidance (SLG; Stability AI's SD3.5 recipe, ``skip_guidance_layers`` of diffusers'
StableDiffusion3Pipeline): on the steps of a window, a further conditional pass of the transformer with some
of its layers skipped, and the guided output moved away from it:

    out' = out + s (eps_c - eps_skip),   on steps i with n * start < i < n * stop

(``out``: the classifier-free guidance output; n: the step count; as the pipeline, only on steps that run the
unconditional half). The term that adjusts the model output: it needs a denoiser that takes ``skip_layers``
(SD3's transformer) and a solver that runs the scheduler's own step (the fused DDIM step has no output to
adjust). The combine is rounded as the pipeline rounds it in bf16 / fp16 (the product in fp32, then the
outputs' dtype; ``ops.pipeline_cfg_combine``), so the bytes equal the pipeline's own call.
"""

from __future__ import annotations

import inspect

import torch

from ..models import denoiser_output
from .base import Batch, GuidanceTerm, StepInputs


class SkipLayerGuidance(GuidanceTerm):
    """SLG over ``layers`` at ``scale`` on steps n * start < i < n * stop of ``steps`` (scale 0: neutral)."""

    name = "skip-layers"
    adjusts_output = True

    def __init__(self, layers: tuple[int, ...], scale: float = 2.8, start: float = 0.01, stop: float = 0.2,
                 steps: int = 28):
        self.layers, self.scale = [int(i) for i in layers], float(scale)
        self.start, self.stop, self.steps = start, stop, steps

    def prepare(self, cond, unet):
        if "skip_layers" not in inspect.signature(unet.forward).parameters:
            raise ValueError(f"skip-layer guidance skips transformer layers: {type(unet).__name__} takes no "
                             "skip_layers (SD3's transformer does)")
        return cond

    def adjusts(self, i: int, batch: Batch) -> bool:
        return self.scale != 0.0 and self.steps * self.start < i < self.steps * self.stop

    def adjust(self, s: StepInputs, out: torch.Tensor, eps_c: torch.Tensor, model) -> torch.Tensor:
        with torch.no_grad():
            skipped = denoiser_output(model, s.x, s.t, {**s.cond.model_kwargs(), "skip_layers": self.layers})
        d = eps_c - skipped
        scale = s.scales[self.name].reshape((1,) * d.dim())
        if out.dtype == torch.float32:
            return out + d.float() * scale
        return out + (d.float() * scale).to(d.dtype)
