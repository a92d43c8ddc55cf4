"""SD3 / SD3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer over 16-channel latents, three text
encoders (two CLIP with projections, T5; their states joined as the pipeline joins them), the pooled CLIP
embeddings as ``pooled_projections``; batched [uncond; cond] CFG; FlowMatchEuler (fixed shift 3.0, or a
dynamic shift where the config asks). The VAE's ``shift_factor`` applies at every decode (``models.decode``).
"""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class StableDiffusion3(PipeAdapter):
    family = "SD3"
    pipelines = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"

    def text_length(self):
        return 77 + self.call_default("max_sequence_length")  # CLIP's 77, then T5's

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size):
        self.no_images(exemplar_images, image_embeds)
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=use_cfg, negative_prompt=negative_prompt,
            max_sequence_length=self.call_default("max_sequence_length"))
        return Conditioning(pe, npe, pooled_projections=pooled, negative_pooled_projections=npooled)
