"""Stable unCLIP (``StableUnCLIPImg2ImgPipeline``): text prompts plus the CLIP image embedding of a real
exemplar, noise-augmented by the pipeline at ``noise_level`` (the paper's dual conditioning; the sampler then
applies its embedding dropout). The embedding reaches the UNet as ``class_labels`` (with its noise-level
embedding); its unconditional half is zeros, as the pipeline's."""

from __future__ import annotations

import torch

from ..conditioning import Conditioning
from .base import PipeAdapter


class StableUnCLIP(PipeAdapter):
    family = "Stable unCLIP"
    pipelines = ("StableUnCLIPImg2ImgPipeline",)
    needs_exemplars = True
    takes_image_embeds = True

    encode_options = ("clip_skip",)

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        pipe, device, n, k = self.pipe, self.device, len(prompts), num_images_per_prompt
        pe, negative = pipe.encode_prompt(prompts, device, k, use_cfg, negative_prompt, **options)
        level = torch.tensor([noise_level], device=device)
        if image_embeds is not None:  # embedded elsewhere; the noise augmentation still applies
            if len(image_embeds) != n:
                raise ValueError(f"{len(image_embeds)} image embeddings for {n} prompts")
            embeds = pipe._encode_image(None, device, n, k, False, level, generators, image_embeds.to(device))
            return Conditioning(pe, negative, embeds, torch.zeros_like(embeds))
        if exemplar_images is None:
            raise ValueError(f"{type(pipe).__name__} conditions on an image embedding: pass one exemplar "
                             "image per prompt")
        if len(exemplar_images) != n:
            raise ValueError(f"{len(exemplar_images)} exemplar images for {n} prompts")
        images = exemplar_images if isinstance(exemplar_images, torch.Tensor) else list(exemplar_images)
        embeds = pipe._encode_image(images, device, n, k, False, level, generators, None)
        return Conditioning(pe, negative, embeds, torch.zeros_like(embeds))
