"""What a pipeline family adapter is: the pipeline classes it runs, what a sample needs, and how prompts
(and exemplars) become the UNet's keyword arguments with the pipeline's own encoders."""

from __future__ import annotations

import torch

from ..conditioning import Conditioning


class PipeAdapter:
    """One diffusers pipeline family. Subclasses set the class attributes and implement ``encode``.

    Class attributes:
        family: the name users know ("SD 1.x / 2.x").
        pipelines: the diffusers pipeline class names it runs (a subclass of one of them runs too).
        needs_exemplars: each sample is conditioned on a real exemplar image as well as its prompt.
        takes_image_embeds: image embeddings computed elsewhere (an open_clip embedder) can replace the
            pipeline's image encoder.
        upcasts_vae: the pipeline decodes in float32 under float16 where its VAE says ``force_upcast``.
        denoiser: the pipeline's attribute holding the denoiser ("unet", or "transformer").
        flow_sigmas: how the pipeline sets a flow schedule's sigmas ("scheduler": the scheduler's own
            spacing; "linspace": 1 to 1 / n evenly, Flux's); see ``solvers.FlowSolver``.
    """

    family: str = ""
    pipelines: tuple[str, ...] = ()
    needs_exemplars: bool = False
    takes_image_embeds: bool = False
    upcasts_vae: bool = False
    denoiser: str = "unet"
    flow_sigmas: str = "scheduler"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        return getattr(self.pipe, self.denoiser).device

    def text_length(self) -> int:
        """Tokens of the text states the pipeline's encoders give (the memory probe's conditioning): its
        call's ``max_sequence_length`` (T5 / Gemma), else its tokenizer's length (CLIP's 77)."""
        import inspect

        if "max_sequence_length" in inspect.signature(type(self.pipe).__call__).parameters:
            return self.call_default("max_sequence_length")
        length = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", 77)
        return length if isinstance(length, int) and length < 1024 else 77

    def call_default(self, name: str):
        """The default of the pipeline's own ``__call__`` argument ``name`` (what a plain call uses)."""
        import inspect

        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    @classmethod
    def runs(cls, pipe_or_class_name) -> bool:
        """Whether this family runs a pipeline object (or a pipeline class name, from model_index.json)."""
        if isinstance(pipe_or_class_name, str):
            return pipe_or_class_name in cls.pipelines
        return any(k.__name__ in cls.pipelines for k in type(pipe_or_class_name).__mro__)

    def encode(self, prompts: list[str], exemplar_images, generators: list[torch.Generator], *, use_cfg: bool,
               negative_prompt=None, noise_level: int = 0, image_embeds: torch.Tensor | None = None,
               image_size: int) -> Conditioning:
        """The conditioning of one row per prompt, encoded with the pipeline's own methods (bit-equal to
        what its ``__call__`` feeds the UNet).

        Args:
            prompts: B prompts. exemplar_images: B images (``needs_exemplars``) or None.
            generators: one per row; any randomness of the encoding (unCLIP's noise augmentation) draws
                from them, in the pipeline's order (before the initial latents).
            use_cfg: encode the unconditional half too. negative_prompt: as the pipeline's.
            noise_level: unCLIP's image-embedding noise augmentation. image_embeds: [B, E] (see
                ``takes_image_embeds``). image_size: the side of the images (SDXL's time ids).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ shared checks

    def no_images(self, exemplar_images, image_embeds) -> None:
        """Refuse exemplars / image embeddings for a family that takes none."""
        name = type(self.pipe).__name__
        if image_embeds is not None:
            raise ValueError(f"{name} takes no image embeddings: an image embedder needs a "
                             "StableUnCLIP-style pipeline")
        if exemplar_images is not None:
            raise ValueError(f"{name} has no image encoder: pass exemplar_images=None, or use a "
                             "StableUnCLIPImg2ImgPipeline for image conditioning")
