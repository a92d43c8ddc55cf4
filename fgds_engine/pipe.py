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


def sampler_from_pipe(cls, pipe, *, classifier, config=None, stats=None):
    """``cls`` (a ``FeedbackGuidedSampler``) over a loaded diffusers pipeline: its UNet, VAE, scheduler (the
    pipeline's own, unless ``config.scheduler`` names another) and encoders.

    Args:
        pipe: a ``StableDiffusionPipeline`` (text conditioning, as the demo code) or a
            ``StableUnCLIPImg2ImgPipeline`` (text + the noise-augmented CLIP image embedding of an
            exemplar, then the engine's embedding dropout: the paper's dual conditioning).
        classifier, config, stats: as for the sampler's constructor.
    Returns:
        a sampler whose ``generate()`` encodes prompts and exemplars with the pipeline.
    """
    check_pipe(pipe)
    return cls(pipe.unet, pipe.vae, classifier, pipe.scheduler, config, stats=stats, pipe=pipe)


def generate(sampler, prompts, exemplar_images=None, labels=None, seeds=None, *, negative_prompt=None,
             noise_level: int = 0, image_embeds: torch.Tensor | None = None, output_type: str = "pil",
             progress: bool = False):
    """Generate one image per prompt with a sampler built by ``from_pipe`` (``sampler.generate``).

    Args:
        prompts: B text prompts (a single string for B = 1).
        exemplar_images: B real images (PIL, or a preprocessed [B, 3, h, w] tensor) for a
            StableUnCLIP-style pipeline; None for a text-only one.
        labels: B target classes of the classifier. seeds: B ints, one generator each (as the pipeline's
            ``generator=[torch.Generator().manual_seed(s) ...]``).
        negative_prompt: as the pipeline's; noise_level: the unCLIP image-embedding noise augmentation.
        image_embeds: [B, E] image embeddings computed elsewhere (an open_clip embedder), in place of
            the pipeline's image encoder and the exemplars.
        output_type: "pil" (``out.pil`` and ``out.images``), "pt" or "latent".
    Returns:
        ``SampleOutput``; with embedding dropout 0 and feedback off, the images are the pipeline's own
        for the same seeds, guidance scale and scheduler, to floating-point rounding.
    """
    from .inputs import check_sample_inputs

    pipe = sampler.pipe
    if pipe is None:
        raise ValueError("generate() needs a sampler built with FeedbackGuidedSampler.from_pipe(pipe, ...)")
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if labels is None or seeds is None:
        raise ValueError("generate() needs labels (the classifier's target classes) and seeds, one per "
                         "prompt")
    labels, seeds = torch.as_tensor(labels).reshape(-1), list(seeds)
    if not len(prompts) == len(labels) == len(seeds):
        raise ValueError(f"batch size mismatch: {len(prompts)} prompts, labels {len(labels)}, "
                         f"seeds {len(seeds)}")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    cond = conditioning_from_pipe(pipe, prompts, exemplar_images, gens, use_cfg=sampler.config.use_cfg,
                                  negative_prompt=negative_prompt, noise_level=noise_level,
                                  image_embeds=image_embeds)
    labels = check_sample_inputs(sampler, cond, labels, seeds, "pt" if output_type == "pil" else output_type)
    with sampler.frozen():
        out = sampler._sample(cond, labels, gens, "latent" if output_type == "latent" else "pt", progress)
    if output_type == "pil":
        from PIL import Image

        arr = (out.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
        out.pil = [Image.fromarray(a) for a in arr]
    return out
