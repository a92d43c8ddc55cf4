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
    transformer = "SD3Transformer2DModel"
    denoiser = "transformer"

    def text_length(self):
        return 77 + self.call_default("max_sequence_length")  # CLIP's 77, then T5's

    config_options = ("num_inference_steps", "guidance_scale", "skip_guidance_layers",
                      "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
    encode_options = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "clip_skip",
                      "max_sequence_length")

    def call_config(self, option, value):
        """Skip-layer guidance's options are the engine's ``skip_layer_guidance*`` (``terms.skip_layers``)."""
        if option == "skip_guidance_layers":
            return {"skip_layer_guidance": None if value is None else tuple(value)}
        return {option: value}

    def size_multiple(self):
        return self.pipe.vae_scale_factor * self.pipe.patch_size

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        self.no_images(exemplar_images, image_embeds)
        options = {"prompt_2": None, "prompt_3": None,
                   "max_sequence_length": self.call_default("max_sequence_length"), **options}
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=use_cfg, negative_prompt=negative_prompt, **options)
        return Conditioning(pe, npe, pooled_projections=pooled, negative_pooled_projections=npooled)
