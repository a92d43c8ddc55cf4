"""Sana (``SanaPipeline``): a linear-attention DiT over a DC-AE's 32-channel latents (32x compression), the
Gemma encoder's states with their attention mask, the prompt prefixed with the pipeline's default
instruction (``complex_human_instruction``; the negative prompt without it, as the pipeline encodes it),
batched [uncond; cond] CFG, DPM-Solver with flow prediction (``solvers.FlowSolver``).
"""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class Sana(PipeAdapter):
    family = "Sana"
    pipelines = ("SanaPipeline",)
    denoiser = "transformer"

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size):
        self.no_images(exemplar_images, image_embeds)
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=use_cfg,
            negative_prompt=(self.call_default("negative_prompt") if negative_prompt is None
                             else negative_prompt),
            num_images_per_prompt=1, device=self.device, clean_caption=self.call_default("clean_caption"),
            max_sequence_length=self.call_default("max_sequence_length"),
            complex_human_instruction=self.call_default("complex_human_instruction"))
        return Conditioning(pe, npe, attention_mask=mask, negative_attention_mask=nmask)
