"""The models of a run, by job:

- ``contracts``: the one call contract each model meets (``denoiser_output``, ``decode``, ``Classifier``) and
  the
  mode / dtype / attention handling of a sampling call;
- ``loaders``: local folders and checkpoint files through diffusers', timm's, torchvision's and open_clip's
  own loaders;
- ``denoisers``: the denoiser call of every backbone (UNets; SD3, Flux, PixArt and Sana transformers);
- ``tiny``, ``tiny_transformers``: tiny random models and pipelines of every family, for tests (no weights,
  no network);
- ``published``: the published configurations (SD 1.5, SDXL) with random weights, for the GPU bench.
Everything is importable from ``fgds_engine.models``.
"""

from .contracts import (
    Classifier,
    cast,
    decode,
    denoiser_output,
    freeze,
    frozen,
    set_attention,
    vae_dtype,
    vae_scale_factor,
)
from .denoisers import TRANSFORMERS, backbone, image_seq_len, latent_channels
from .loaders import (
    UnsafeCheckpointError,
    load_open_clip_embedder,
    load_scheduler,
    load_state_dict_file,
    load_timm_classifier,
    load_torchvision_classifier,
    load_unet,
    load_vae,
    safe_torch_load,
)
from .tiny import (
    TINY_KINDS,
    TINY_PROJ_DIM,
    TINY_TEXT_DIM,
    Models,
    small_models,
    tiny_classifier,
    tiny_models,
    tiny_pipeline,
    tiny_tokenizer,
)
from .tiny_transformers import TINY_FLOW_KINDS, tiny_flow_pipeline

__all__ = [
    "TINY_KINDS", "TINY_PROJ_DIM", "TINY_TEXT_DIM", "Classifier", "Models", "UnsafeCheckpointError", "cast",
    "decode", "freeze", "frozen", "load_open_clip_embedder", "load_scheduler", "load_state_dict_file",
    "load_timm_classifier", "load_torchvision_classifier", "load_unet", "load_vae", "safe_torch_load",
    "set_attention", "small_models", "tiny_classifier", "tiny_models", "tiny_pipeline", "tiny_tokenizer",
    "denoiser_output", "vae_dtype", "vae_scale_factor", "TRANSFORMERS", "backbone", "image_seq_len",
    "latent_channels", "tiny_flow_pipeline", "TINY_FLOW_KINDS",
]
