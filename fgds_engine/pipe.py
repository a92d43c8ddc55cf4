"""Conditioning from an already loaded diffusers pipeline, with the pipeline's own encoders.

``StableDiffusionPipeline``: text prompts (the demo code's conditioning).
``StableUnCLIPImg2ImgPipeline``: text prompts plus the CLIP image embedding of a real exemplar,
noise-augmented by the pipeline at ``noise_level`` (the paper's dual conditioning; the sampler then applies
its embedding dropout). Both encoders are the pipeline's methods: the embeddings are bit-equal to its own.
"""

from __future__ import annotations

import torch

from .conditioning import Conditioning


def has_image_encoder(pipe) -> bool:
    """Whether the pipeline conditions on CLIP image embeddings (a StableUnCLIP-style pipeline)."""
    return getattr(pipe, "image_encoder", None) is not None and hasattr(pipe, "noise_image_embeddings")


def check_pipe(pipe) -> None:
    """Refuse pipelines that lack what ``from_pipe`` reuses, naming what is missing."""
    missing = [n for n in ("unet", "vae", "scheduler", "encode_prompt") if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(f"{type(pipe).__name__} has no {', '.join(missing)}: from_pipe needs a Stable "
                         "Diffusion style pipeline (StableDiffusionPipeline or StableUnCLIPImg2ImgPipeline)")


@torch.no_grad()
def conditioning_from_pipe(pipe, prompts: list[str], exemplar_images, generators: list[torch.Generator], *,
                           use_cfg: bool, negative_prompt=None, noise_level: int = 0,
                           image_embeds: torch.Tensor | None = None) -> Conditioning:
    """Encode prompts (and exemplar images) with the pipeline's encoders, one row per prompt.

    The unCLIP image noise augmentation draws from ``generators[i]`` for row i, before the initial latents,
    in the pipeline's own order. ``image_embeds`` (e.g. from an open_clip embedder) replace the pipeline's
    image encoder; the noise augmentation still applies.
    """
    device = pipe.unet.device
    prompt_embeds, negative = pipe.encode_prompt(prompts, device, 1, use_cfg, negative_prompt)
    level = torch.tensor([noise_level], device=device)
    if image_embeds is not None:
        if not hasattr(pipe, "noise_image_embeddings"):
            raise ValueError(f"{type(pipe).__name__} takes no image embeddings: an image embedder needs a "
                             "StableUnCLIP-style pipeline")
        if len(image_embeds) != len(prompts):
            raise ValueError(f"{len(image_embeds)} image embeddings for {len(prompts)} prompts")
        embeds = pipe._encode_image(None, device, len(prompts), 1, False, level, generators,
                                    image_embeds.to(device))
        return Conditioning(prompt_embeds, negative, embeds, torch.zeros_like(embeds))
    if not has_image_encoder(pipe):
        if exemplar_images is not None:
            raise ValueError(f"{type(pipe).__name__} has no image encoder: pass exemplar_images=None, or "
                             "use a StableUnCLIPImg2ImgPipeline for image conditioning")
        return Conditioning(prompt_embeds, negative)
    if exemplar_images is None:
        raise ValueError(f"{type(pipe).__name__} conditions on an image embedding: pass one exemplar image "
                         "per prompt")
    if len(exemplar_images) != len(prompts):
        raise ValueError(f"{len(exemplar_images)} exemplar images for {len(prompts)} prompts")
    images = exemplar_images if isinstance(exemplar_images, torch.Tensor) else list(exemplar_images)
    embeds = pipe._encode_image(images, device, len(prompts), 1, False, level, generators, None)
    return Conditioning(prompt_embeds, negative, embeds, torch.zeros_like(embeds))
