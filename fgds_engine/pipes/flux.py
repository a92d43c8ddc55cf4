"""Flux (``FluxPipeline``): FLUX.1-dev and -schnell. A transformer over 2x2-packed latents (packed and
unpacked inside the denoiser call, ``models.denoisers``), CLIP's pooled embedding and T5's states;
FlowMatchEuler over the pipeline's own sigmas (1 to 1 / n, evenly) with the dynamic shift mu of the image's
sequence length.

Guidance as the pipeline does it:
- a guidance-distilled model (``guidance_embeds``: FLUX.1-dev) takes the guidance scale as an input and makes
  **no** unconditional pass (the sampler adds ``guidance`` and leaves the CFG term out);
- a model without it (FLUX.1-schnell) runs true CFG where the guidance scale is above 1: the negative prompt
  ("" when none is given) as the unconditional half, as the pipeline's ``true_cfg_scale`` with a
  ``negative_prompt`` (batched here; the pipeline makes two calls, equal to rounding).
"""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class Flux(PipeAdapter):
    family = "Flux"
    pipelines = ("FluxPipeline",)
    denoiser = "transformer"
    flow_sigmas = "linspace"

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size):
        self.no_images(exemplar_images, image_embeds)
        n, length = len(prompts), self.call_default("max_sequence_length")
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                num_images_per_prompt=1, max_sequence_length=length)
        npe = npooled = None
        if use_cfg:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * n if isinstance(negative, str) else list(negative)
            npe, npooled, _ = self.pipe.encode_prompt(prompt=negative, prompt_2=None, device=self.device,
                                                      num_images_per_prompt=1, max_sequence_length=length)
        return Conditioning(pe, npe, pooled_projections=pooled, negative_pooled_projections=npooled)
