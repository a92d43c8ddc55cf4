"""SDXL (``StableDiffusionXLPipeline``): two text encoders (hidden states concatenated), the pooled text
embedding of the second and six size / crop ids as the UNet's ``added_cond_kwargs``.

The time ids are the pipeline's defaults for an image of the sampler's size: original size = target size =
the image size, crop (0, 0); the unconditional half uses the same ids and the negative pooled embedding
(zeros for an empty negative prompt where the pipeline's ``force_zeros_for_empty_prompt`` says so). The VAE's
own ``scaling_factor`` (0.13025) and ``force_upcast`` (decode and the feedback gradient through the decoder
in float32 under a float16 run) are the sampler's business (``models.decode``, ``models.vae_dtype``)."""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class StableDiffusionXL(PipeAdapter):
    family = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    upcasts_vae = True

    encode_options = ("prompt_2", "negative_prompt_2", "clip_skip")

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        self.no_images(exemplar_images, image_embeds)
        pipe, n = self.pipe, len(prompts) * num_images_per_prompt
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompts, options.pop("prompt_2", None), self.device, num_images_per_prompt, use_cfg,
            negative_prompt, **options)
        if pipe.text_encoder_2 is None:
            proj = int(pooled.shape[-1])
        else:
            proj = pipe.text_encoder_2.config.projection_dim
        size = (image_size, image_size)
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
        ids = ids.to(self.device).repeat(n, 1)
        added = {"text_embeds": pooled, "time_ids": ids}
        negative = None if npe is None else {"text_embeds": npooled, "time_ids": ids}
        return Conditioning(pe, npe, added_cond_kwargs=added, negative_added_cond_kwargs=negative)
