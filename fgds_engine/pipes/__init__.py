"""One adapter per diffusers pipeline family the engine runs; ``from_pipe`` picks one or refuses the pipeline.

Each family is one file (``sd.py``, ``unclip.py``, ``sdxl.py``; the transformer families ``sd3.py``,
``flux.py``, ``pixart.py``, ``sana.py``): the pipeline classes it runs and how its prompts (and exemplars)
become the denoiser's keyword arguments with the pipeline's own encoders, so the embeddings are bit-equal to
what the pipeline's own call feeds its UNet or transformer. Adding a family is one file, its
entry in ``FAMILIES`` and its row in ``tests/test_pipes.py`` (UNet families) or
``tests/test_flow_families.py`` (transformer families), the shared contract.
"""

from __future__ import annotations

from ..config import SamplerConfig
from ..models import backbone
from .base import PipeAdapter
from .call import generate  # noqa: F401  (the sampler's generate(); its home is pipes.call)
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


def family_of_denoiser(model) -> type[PipeAdapter] | None:
    """The transformer family whose denoiser ``model`` is (by its class), or None (a UNet: its family is
    the pipeline's). A sampler built from a transformer directly reads its schedule and dtypes here."""
    name = backbone(model)
    return next((f for f in FAMILIES if f.transformer and f.transformer == name), None)


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


def pipeline_config(pipe, **fields) -> SamplerConfig:
    """The ``SamplerConfig`` of a plain ``pipe()`` call of this pipeline (its default steps, guidance scale
    with the pipeline's meaning, image size, no embedding dropout; ``PipeAdapter.pipeline_defaults``), the
    engine's feedback defaults, and ``fields`` on top:
    ``from_pipe(pipe, classifier=c, config=pipeline_config(pipe, feedback_scale=0.05))``."""
    return SamplerConfig(**{**adapter_for(pipe).pipeline_defaults(), **fields})


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
        classifier, runtime, stats: as for the sampler's constructor.
        config: the run's ``SamplerConfig``, taken as given (its unset fields are the paper's); None: the
            pipeline's own defaults (``pipeline_config(pipe)``: its steps, guidance scale, image size, no
            embedding dropout) with the engine's feedback defaults.
    Returns:
        a sampler whose ``generate()`` encodes prompts and exemplars with the pipeline.
    """
    adapter = adapter_for(pipe)  # refused in one line before the denoiser / VAE are read
    config = pipeline_config(pipe) if config is None else config
    return cls(getattr(pipe, adapter.denoiser), pipe.vae, classifier, pipe.scheduler, config, runtime=runtime,
               stats=stats, pipe=pipe)
