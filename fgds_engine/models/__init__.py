"""The models of a run, by job:

- ``contracts``: the one call contract each model meets (``unet_eps``, ``decode``, ``Classifier``) and the
  mode / dtype / attention handling of a sampling call;
- ``loaders``: local folders and checkpoint files through diffusers', timm's, torchvision's and open_clip's
  own loaders;
- ``tiny``: tiny random models and pipelines of every family, for tests (no weights, no network);
- ``published``: the published configurations (SD 1.5, SDXL) with random weights, for the GPU bench.
Everything is importable from ``fgds_engine.models``.
"""

from .contracts import (
    Classifier,
    cast,
    decode,
    freeze,
    frozen,
    set_attention,
    unet_eps,
    vae_dtype,
    vae_scale_factor,
)
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

__all__ = [
    "TINY_KINDS", "TINY_PROJ_DIM", "TINY_TEXT_DIM", "Classifier", "Models", "UnsafeCheckpointError", "cast",
    "decode", "freeze", "frozen", "load_open_clip_embedder", "load_scheduler", "load_state_dict_file",
    "load_timm_classifier", "load_torchvision_classifier", "load_unet", "load_vae", "safe_torch_load",
    "set_attention", "small_models", "tiny_classifier", "tiny_models", "tiny_pipeline", "tiny_tokenizer",
    "unet_eps", "vae_dtype", "vae_scale_factor",
]
