"""PixArt-Sigma (``PixArtSigmaPipeline``): a DiT over SD's 4-channel latents, T5's states with their attention
mask (``encoder_attention_mask``), the learned-sigma output (2C channels, the first C kept), batched
[uncond; cond] CFG, DPM-Solver++ on the DDPM schedule (epsilon prediction). Captions are preprocessed as
the pipeline's own call does (its ``clean_caption`` default).
"""

from __future__ import annotations

import importlib

from ..conditioning import Conditioning
from ..errors import InputError
from .base import PipeAdapter


class PixArtSigma(PipeAdapter):
    family = "PixArt-Sigma"
    pipelines = ("PixArtSigmaPipeline",)
    transformer = "PixArtTransformer2DModel"
    denoiser = "transformer"

    encode_options = ("max_sequence_length",)
    # the transformer's sample size -> its pipeline's aspect-ratio bins (``use_resolution_binning``)
    bins = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
            32: "ASPECT_RATIO_256_BIN"}

    def resolution_bins(self):
        """The bins of the pipeline's ``use_resolution_binning`` for this transformer's sample size; any other
        size is refused in one line, where the pipeline raises "Invalid sample size"."""
        size = self.pipe.transformer.config.sample_size
        if size not in self.bins:
            raise InputError(f"{type(self.pipe).__name__}'s use_resolution_binning=True has no bins for a "
                             f"transformer of sample_size {size} (it has {', '.join(map(str, self.bins))}); "
                             "pass use_resolution_binning=False")
        module = importlib.import_module(type(self.pipe).__module__)
        return getattr(module, self.bins[size])

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        self.no_images(exemplar_images, image_embeds)
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=use_cfg,
            negative_prompt=(self.call_default("negative_prompt") if negative_prompt is None
                             else negative_prompt),
            num_images_per_prompt=num_images_per_prompt, device=self.device,
            clean_caption=self.call_default("clean_caption"),
            max_sequence_length=options.get("max_sequence_length", self.call_default("max_sequence_length")),
            **self.encode_extras())
        return Conditioning(pe, npe, attention_mask=mask, negative_attention_mask=nmask)

    def encode_extras(self) -> dict:
        """Further ``encode_prompt`` arguments of a family encoded the same way (Sana's instruction)."""
        return {}
