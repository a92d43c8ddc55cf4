"""Flux (``FluxPipeline``): FLUX.1-dev and -schnell. A transformer over 2x2-packed latents (packed and
unpacked inside the denoiser call, ``models.denoisers``), CLIP's pooled embedding and T5's states;
FlowMatchEuler over the pipeline's own sigmas (1 to 1 / n, evenly) with the dynamic shift mu of the image's
sequence length.

Guidance as the pipeline does it:
- a guidance-distilled model (``guidance_embeds``: FLUX.1-dev) takes the guidance scale as an input and makes
  **no** unconditional pass (the sampler adds ``guidance`` and leaves the CFG term out);
- a model without it (FLUX.1-schnell) runs true CFG where the guidance scale is above 1: the negative prompt
  ("" when none is given) as the unconditional half, as the pipeline's ``true_cfg_scale`` with a
  ``negative_prompt`` (batched here; the pipeline makes two calls, equal to rounding);
- FLUX.1-dev with ``true_cfg_scale`` (``SamplerConfig.true_cfg_scale``) runs both: the embedded scale and
  true CFG with the negative prompt.

Through ``generate(**options)`` the options keep the pipeline's meanings (``call_config``).
"""

from __future__ import annotations

from ..conditioning import Conditioning
from ..errors import InputError
from .base import PipeAdapter


class Flux(PipeAdapter):
    family = "Flux"
    pipelines = ("FluxPipeline",)
    transformer = "FluxTransformer2DModel"
    denoiser = "transformer"
    flow_sigmas = "linspace"
    config_options = ("num_inference_steps", "guidance_scale", "true_cfg_scale")
    encode_options = ("prompt_2", "negative_prompt_2", "max_sequence_length")

    @property
    def embedded(self) -> bool:
        """A guidance-distilled model (FLUX.1-dev): the guidance scale is its input."""
        return bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))

    def call_config(self, option, value):
        """The pipeline's meanings: ``guidance_scale`` is FLUX.1-dev's embedded scale (a model without the
        embedding ignores it, as the pipeline does); ``true_cfg_scale`` is classifier-free guidance with the
        negative prompt (the engine's ``guidance_scale`` for a model without the embedding)."""
        if option == "guidance_scale":
            return {"guidance_scale": value} if self.embedded else {}
        if option == "true_cfg_scale":
            return {"true_cfg_scale" if self.embedded else "guidance_scale": value}
        return super().call_config(option, value)

    def check_call(self, options):
        if options.get("true_cfg_scale", 1.0) > 1 and options.get("negative_prompt") is None:
            raise InputError(f"FluxPipeline's true_cfg_scale={options['true_cfg_scale']!r} needs a "
                             "negative_prompt (without one the pipeline runs no classifier-free guidance)")

    def pipeline_defaults(self):
        out = super().pipeline_defaults()
        if not self.embedded:  # its CFG is true_cfg_scale's (default 1: none)
            out["guidance_scale"] = float(self.call_default("true_cfg_scale"))
        return out

    def size_multiple(self):
        return self.pipe.vae_scale_factor * 2

    def encode(self, prompts, exemplar_images, generators, *, use_cfg, negative_prompt=None, noise_level=0,
               image_embeds=None, image_size, num_images_per_prompt=1, **options):
        self.no_images(exemplar_images, image_embeds)
        n = len(prompts)
        length = options.get("max_sequence_length", self.call_default("max_sequence_length"))
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=options.get("prompt_2"), device=self.device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=length)
        npe = npooled = None
        if use_cfg:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * n if isinstance(negative, str) else list(negative)
            negative_2 = options.get("negative_prompt_2")
            npe, npooled, _ = self.pipe.encode_prompt(
                prompt=negative, prompt_2=negative_2, device=self.device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=length)
        return Conditioning(pe, npe, pooled_projections=pooled, negative_pooled_projections=npooled)
