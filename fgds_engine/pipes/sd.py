"""SD 1.x and 2.x (``StableDiffusionPipeline``): text conditioning, the demo code's. SD 2.x's v-prediction is
the scheduler's ``prediction_type``, which the solvers read; nothing here depends on it."""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import PipeAdapter


class StableDiffusion(PipeAdapter):
    family = "SD 1.x / 2.x"
    pipelines = ("StableDiffusionPipeline",)

    encode_options = ("clip_skip",)

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        self.no_images(exemplar_images, image_embeds)
        pe, negative = self.pipe.encode_prompt(prompts, self.device, num_images_per_prompt, use_cfg,
                                               negative_prompt, **options)
        return Conditioning(pe, negative)
