"""What a pipeline family adapter is: the pipeline classes it runs, what a sample needs, and how prompts
(and exemplars) become the UNet's keyword arguments with the pipeline's own encoders."""

from __future__ import annotations

import inspect

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
        transformer: the denoiser class of a transformer family: a sampler built from that denoiser
            directly (no pipeline) still gets the family's schedule and latent dtype (``family_of_denoiser``).
        float32_latents: the pipeline keeps its latents and the model's outputs in float32 under a bf16 / fp16
            denoiser (Sana's); otherwise they are in the denoiser's dtype.
    """

    family: str = ""
    pipelines: tuple[str, ...] = ()
    needs_exemplars: bool = False
    takes_image_embeds: bool = False
    upcasts_vae: bool = False
    denoiser: str = "unet"
    flow_sigmas: str = "scheduler"
    transformer: str = ""
    float32_latents: bool = False

    # the pipeline's call options (``pipes.call``): those that set a SamplerConfig field, those its
    # ``encode_prompt`` takes
    config_options: tuple[str, ...] = ("num_inference_steps", "guidance_scale", "eta")
    encode_options: tuple[str, ...] = ()

    def __init__(self, pipe):
        self.pipe = pipe

    def call_config(self, option: str, value) -> dict:
        """The ``SamplerConfig`` fields a pipeline call option sets (its own name, by default)."""
        return {option: value}

    def check_call(self, options: dict) -> None:
        """Refuse a combination of call options the engine would not run as the pipeline does."""

    def pipeline_defaults(self) -> dict:
        """The ``SamplerConfig`` fields of a plain ``pipe()`` call: its default steps, guidance scale and
        image size, no embedding dropout (``pipes.pipeline_config``)."""
        out = {"num_inference_steps": self.call_default("num_inference_steps"),
               "guidance_scale": float(self.call_default("guidance_scale")), "embedding_dropout": 0.0}
        height = inspect.signature(type(self.pipe).__call__).parameters.get("height")
        if height is not None and isinstance(height.default, int):  # Sana's 1024
            out["image_size"] = height.default
        return out

    def size_multiple(self) -> int:
        """What the pipeline requires its height and width to be multiples of (its ``check_inputs``)."""
        return 8

    def resolution_bins(self):
        """The aspect-ratio bins of a pipeline that renders at binned sizes (``use_resolution_binning``), for
        its transformer's sample size; None for a family without binning."""
        return None

    @property
    def device(self) -> torch.device:
        return getattr(self.pipe, self.denoiser).device

    def text_length(self) -> int:
        """Tokens of the text states the pipeline's encoders give (the memory probe's conditioning): its
        call's ``max_sequence_length`` (T5 / Gemma), else its tokenizer's length (CLIP's 77)."""
        if "max_sequence_length" in inspect.signature(type(self.pipe).__call__).parameters:
            return self.call_default("max_sequence_length")
        length = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", 77)
        return length if isinstance(length, int) and length < 1024 else 77

    def call_default(self, name: str):
        """The default of the pipeline's own ``__call__`` argument ``name`` (what a plain call uses)."""
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    @classmethod
    def runs(cls, pipe_or_class_name) -> bool:
        """Whether this family runs a pipeline object (or a pipeline class name, from model_index.json)."""
        if isinstance(pipe_or_class_name, str):
            return pipe_or_class_name in cls.pipelines
        return any(k.__name__ in cls.pipelines for k in type(pipe_or_class_name).__mro__)

    def encode(self, prompts: list[str], exemplar_images, generators: list[torch.Generator], *, use_cfg: bool,
               negative_prompt=None, noise_level: int = 0, image_embeds: torch.Tensor | None = None,
               image_size: int, num_images_per_prompt: int = 1, **options) -> Conditioning:
        """The conditioning of one row per prompt, encoded with the pipeline's own methods (bit-equal to
        what its ``__call__`` feeds the UNet).

        Args:
            prompts: B prompts. exemplar_images: B images (``needs_exemplars``) or None.
            generators: one per row; any randomness of the encoding (unCLIP's noise augmentation) draws
                from them, in the pipeline's order (before the initial latents).
            use_cfg: encode the unconditional half too. negative_prompt: as the pipeline's.
            noise_level: unCLIP's image-embedding noise augmentation. image_embeds: [B, E] (see
                ``takes_image_embeds``). image_size: the side of the images (SDXL's time ids).
            num_images_per_prompt: rows per prompt, repeated as the pipeline repeats them.
            options: the family's ``encode_options`` of the call (second prompts, clip_skip, ...).
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
