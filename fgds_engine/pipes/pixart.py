"""PixArt-Sigma (``PixArtSigmaPipeline``): a DiT over SD's 4-channel latents, T5's states with their attention
mask (``encoder_attention_mask``), the learned-sigma output (2C channels, the first C kept), batched
[uncond; cond] CFG, DPM-Solver++ on the DDPM schedule (epsilon prediction). Captions are preprocessed as
the pipeline's own call does (its ``clean_caption`` default).
"""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class PixArtSigma(PipeAdapter):
    family = "PixArt-Sigma"
    pipelines = ("PixArtSigmaPipeline",)
    denoiser = "transformer"

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size):
        self.no_images(exemplar_images, image_embeds)
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=use_cfg,
            negative_prompt=(self.call_default("negative_prompt") if negative_prompt is None
                             else negative_prompt),
            num_images_per_prompt=1, device=self.device, clean_caption=self.call_default("clean_caption"),
            max_sequence_length=self.call_default("max_sequence_length"), **self.encode_extras())
        return Conditioning(pe, npe, attention_mask=mask, negative_attention_mask=nmask)

    def encode_extras(self) -> dict:
        """Further ``encode_prompt`` arguments of a family encoded the same way (Sana's instruction)."""
        return {}
