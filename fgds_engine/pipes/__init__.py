"""One adapter per diffusers pipeline family the engine runs; ``from_pipe`` picks one or refuses the pipeline.

Each family is one file (``sd.py``, ``unclip.py``, ``sdxl.py``; the transformer families ``sd3.py``,
``flux.py``, ``pixart.py``, ``sana.py``): the pipeline classes it runs and how its prompts (and exemplars)
become the denoiser's keyword arguments with the pipeline's own encoders, so the embeddings are bit-equal to
what the pipeline's own call feeds its UNet or transformer. Adding a family is one file, its
entry in ``FAMILIES`` and its row in ``tests/test_pipes.py`` (UNet families) or
``tests/test_flow_families.py`` (transformer families), the shared contract.
"""

from __future__ import annotations

import torch

from .base import PipeAdapter
from .flux import Flux
from .pixart import PixArtSigma
from .sana import Sana
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .unclip import StableUnCLIP

FAMILIES: tuple[type[PipeAdapter], ...] = (StableDiffusion, StableUnCLIP, StableDiffusionXL, StableDiffusion3,
                                           Flux, PixArtSigma, Sana)


def supported() -> str:
    """The families and their pipeline classes, in one phrase."""
    return ", ".join(f"{f.family} ({' / '.join(f.pipelines)})" for f in FAMILIES)


def family_of(pipe_or_class_name) -> type[PipeAdapter] | None:
    """The family that runs a pipeline object or class name, or None."""
    return next((f for f in FAMILIES if f.runs(pipe_or_class_name)), None)


def unsupported_message(class_name: str) -> str:
    return f"{class_name} is not a pipeline family the engine runs; it runs {supported()}"


def adapter_for(pipe) -> PipeAdapter:
    """The adapter of ``pipe``'s family; any other pipeline is refused in one line naming the families."""
    family = family_of(pipe)
    if family is None:
        raise ValueError(unsupported_message(type(pipe).__name__))
    missing = [n for n in (family.denoiser, "vae", "scheduler") if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(f"{type(pipe).__name__} has no {', '.join(missing)}: the engine needs its "
                         f"{family.denoiser}, VAE and scheduler")
    return family(pipe)


def needs_exemplars(pipe) -> bool:
    """Whether each sample of this pipeline is conditioned on a real exemplar image."""
    family = family_of(pipe)
    return family is not None and family.needs_exemplars


def takes_image_embeds(pipe) -> bool:
    """Whether image embeddings computed elsewhere (an open_clip embedder) can condition this pipeline."""
    family = family_of(pipe)
    return family is not None and family.takes_image_embeds


def sampler_from_pipe(cls, pipe, *, classifier, config=None, runtime=None, stats=None):
    """``cls`` (a ``FeedbackGuidedSampler``) over a loaded diffusers pipeline: its UNet, VAE, scheduler (the
    pipeline's own, unless ``config.scheduler`` names another) and encoders.

    Args:
        pipe: a pipeline of a family in ``FAMILIES``: ``StableDiffusionPipeline`` (SD 1.x / 2.x, text, as the
            demo code), ``StableUnCLIPImg2ImgPipeline`` (text + the noise-augmented CLIP image embedding of
            an exemplar, then the engine's embedding dropout: the paper's dual conditioning) or
            ``StableDiffusionXLPipeline`` (two text encoders, pooled embedding, size / crop ids),
            ``StableDiffusion3Pipeline``, ``FluxPipeline`` (FLUX.1-dev's guidance embedding or true CFG),
            ``PixArtSigmaPipeline`` or ``SanaPipeline``. Any other is refused (``ValueError``, one line
            naming the families).
        classifier, config, runtime, stats: as for the sampler's constructor.
    Returns:
        a sampler whose ``generate()`` encodes prompts and exemplars with the pipeline.
    """
    adapter = adapter_for(pipe)  # refused in one line before the denoiser / VAE are read
    return cls(getattr(pipe, adapter.denoiser), pipe.vae, classifier, pipe.scheduler, config, runtime=runtime,
               stats=stats, pipe=pipe)


def generate(sampler, prompts, exemplar_images=None, labels=None, seeds=None, *, negative_prompt=None,
             noise_level: int = 0, image_embeds: torch.Tensor | None = None, output_type: str = "pil",
             progress: bool = False):
    """Generate one image per prompt with a sampler built by ``from_pipe`` (``sampler.generate``).

    Args:
        prompts: B text prompts (a single string for B = 1).
        exemplar_images: B real images (PIL, or a preprocessed [B, 3, h, w] tensor) for a
            StableUnCLIP-style pipeline; None for a text-only one (SD, SDXL).
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
    with torch.no_grad():
        use_cfg = sampler.terms.unconditional is not None
        cond = sampler.adapter.encode(prompts, exemplar_images, gens, use_cfg=use_cfg,
                                      negative_prompt=negative_prompt, noise_level=noise_level,
                                      image_embeds=image_embeds, image_size=sampler.image_size)
    out = sampler.sample(cond, labels, seeds, output_type="latent" if output_type == "latent" else "pt",
                         progress=progress, generators=gens)
    if output_type == "pil":
        from PIL import Image

        arr = (out.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
        out.pil = [Image.fromarray(a) for a in arr]
    return out
