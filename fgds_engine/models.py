"""Adapters that give every model one call contract, local loaders, and tiny random configs for tests.

Contracts (the sampler never knows which library a model comes from):
    unet_eps(unet, x, t, the UNet's keyword arguments) -> model output (eps / v / x0)
    decode(vae, latents) -> images in about [-1, 1] (``vae=None``: pixel space, identity)
    Classifier(model)(images, with_features) -> logits, or (logits, penultimate features)
Nothing here touches the network: loaders take local folders and files only.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unet_eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond=None,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Model output of a diffusers UNet2DConditionModel / UNet2DModel for latents x at timestep t.

    ``cond``: the UNet's keyword arguments as a dict, a ``Conditioning`` (its conditional half), or the
    text hidden states (``encoder_hidden_states``) with ``class_labels`` beside them.
    """
    if hasattr(cond, "unet_kwargs"):
        kw = cond.unet_kwargs()
    elif isinstance(cond, dict):
        kw = cond
    else:
        kw = {k: v for k, v in (("encoder_hidden_states", cond), ("class_labels", class_labels))
              if v is not None}
    return unet(x, t, return_dict=False, **kw)[0]


def vae_scale_factor(vae: nn.Module | None) -> int:
    """Pixels per latent cell (1 in pixel space)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def decode(vae: nn.Module | None, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of latents, in the VAE's own dtype (an SDXL VAE kept in fp32 decodes fp16 latents in fp32),
    after the VAE's own scaling: ``latents / scaling_factor``, or ``latents * std / scaling_factor + mean``
    where the config gives latent statistics. Identity in pixel space."""
    if vae is None:
        return latents
    cfg = vae.config
    dtype = next(vae.parameters()).dtype
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    return vae.decode(latents.to(dtype), return_dict=False)[0]


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot find the classifier head: the model has no nn.Linear layer")
    return linears[-1]


class Classifier(nn.Module):
    """Logits, and on request penultimate features, from a timm, torchvision or plain classifier.

    timm models use ``forward_features`` + ``forward_head(pre_logits=True)`` and ``get_classifier()``;
    any other model gives its features as the input of its last ``nn.Linear`` (torchvision's ``fc``,
    ``classifier[-1]``, ``heads.head``), captured with a forward pre-hook.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_timm = all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier"))
        self._head = None if self.is_timm else _last_linear(model)

    @property
    def num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)  # timm, and any model that declares it
        return int(n) if isinstance(n, int) else int(self._head.out_features)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The fixed (H, W) input size the model requires (ViTs), or None if any size works."""
        pe = getattr(self.model, "patch_embed", None)
        if pe is not None and getattr(pe, "strict_img_size", False):
            return tuple(pe.img_size)
        size = getattr(self.model, "image_size", None)  # torchvision VisionTransformer
        return (size, size) if isinstance(size, int) else None

    def forward(self, images: torch.Tensor, with_features: bool = False):
        if not with_features:
            return self.model(images)
        if self.is_timm:
            z = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            return self.model.get_classifier()(z), z
        captured: list[torch.Tensor] = []
        handle = self._head.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits, captured[-1]


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Eval mode and no parameter gradients for the duration of a ``with`` block; each module's training
    flag and each parameter's requires_grad are restored on exit (the caller's models as they were)."""
    mods = [m for m in modules if m is not None]
    saved = [(m, [(sub, sub.training) for sub in m.modules()], [(p, p.requires_grad) for p in m.parameters()])
             for m in mods]
    freeze(*mods)
    try:
        yield
    finally:
        for _, subs, params in saved:
            for sub, training in subs:
                sub.training = training
            for p, flag in params:
                p.requires_grad_(flag)


def freeze(*modules: nn.Module | None) -> None:
    """Eval mode and no parameter gradients: the engine differentiates with respect to inputs only."""
    for m in modules:
        if m is not None:
            m.eval().requires_grad_(False)


# ---------------------------------------------------------------- local loaders (never the network)

def vae_dtype(vae: nn.Module | None, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a VAE runs in for a run in ``dtype`` (None: as it is): float32 where it would be float16 and
    its config says ``force_upcast`` (the SDXL VAE overflows to NaN in float16; its pipeline decodes in
    float32 too), else ``dtype``."""
    if vae is None:
        return dtype
    current = next(vae.parameters()).dtype
    if (dtype or current) == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def cast(module: nn.Module | None, dtype: torch.dtype | None) -> None:
    """``module.to(dtype)`` in place where its parameters are in another dtype. diffusers (0.42) warns on
    every dtype cast that modules "should be kept in float32: []", even when none should: held back."""
    if module is None or dtype is None or all(p.dtype == dtype for p in module.parameters()):
        return
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        module.to(dtype=dtype)
    finally:
        dlog.set_verbosity(level)


def _local_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p} (models load from local folders only)")
    return p


class UnsafeCheckpointError(ValueError):
    """A checkpoint that is a pickle able to run code (not plain tensors): refused, never executed."""


def safe_torch_load(path: str | Path, map_location="cpu"):
    """``torch.load(weights_only=True)``; a pickle needing arbitrary objects raises UnsafeCheckpointError."""
    import pickle

    p = _local_dir(path, "checkpoint")
    try:
        return torch.load(str(p), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refusing to load {p}: it is a pickle that would run code or build arbitrary objects "
            f"({first}); save the weights as safetensors or a plain state dict of tensors") from None


def load_state_dict_file(path: str | Path) -> dict:
    """Tensors of a local checkpoint: safetensors, or a torch file read with ``weights_only=True``.

    A pickle that would construct arbitrary objects (and so could run code) raises UnsafeCheckpointError
    without running it. A wrapping ``{"state_dict": ...}`` / ``{"model": ...}`` and DDP's "module." prefixes
    are unwrapped.
    """
    p = _local_dir(path, "checkpoint")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = safe_torch_load(p)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{p} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_unet(path: str | Path, *, subfolder: str | None = None, dtype: torch.dtype | None = None):
    """A diffusers UNet (class read from its config.json) from a local folder."""
    import diffusers

    root = _local_dir(path, "UNet folder")
    folder = root / subfolder if subfolder else root
    name = json.loads((_local_dir(folder / "config.json", "UNet config")).read_text())["_class_name"]
    cls = getattr(diffusers, name)
    return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)


def load_vae(path: str | Path, *, subfolder: str | None = None, dtype: torch.dtype | None = None):
    """A diffusers AutoencoderKL from a local folder."""
    from diffusers import AutoencoderKL

    root = _local_dir(path, "VAE folder")
    return AutoencoderKL.from_pretrained(str(root), subfolder=subfolder, local_files_only=True,
                                         torch_dtype=dtype)


def load_scheduler(path: str | Path, *, subfolder: str | None = None):
    """The scheduler a local config names (its ``_class_name``, as a pipeline loads it: SD 1.5 ships PNDM);
    ``SamplerConfig(scheduler=...)`` then picks another from it if asked."""
    import json

    import diffusers

    root = _local_dir(path, "scheduler folder")
    config = (root / subfolder if subfolder else root) / "scheduler_config.json"
    name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    cls = getattr(diffusers, name or "", None) or diffusers.DDIMScheduler
    return cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)


def load_timm_classifier(name: str, *, num_classes: int, checkpoint: str | Path | None = None,
                         pretrained: bool = False, **model_kwargs) -> nn.Module:
    """A timm model by architecture name: timm's pretrained weights (through the Hugging Face hub and its
    cache, as timm loads them), a local checkpoint file, or random weights."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    if checkpoint:
        model.load_state_dict(load_state_dict_file(checkpoint))
    return model


def load_torchvision_classifier(name: str, *, num_classes: int, checkpoint: str | Path | None = None,
                                pretrained: bool = False, **model_kwargs) -> nn.Module:
    """A torchvision model by name: its DEFAULT pretrained weights (torch hub cache; the head is replaced
    when num_classes differs), a local state-dict file, or random weights."""
    import torchvision

    if pretrained:
        model = torchvision.models.get_model(name, weights="DEFAULT", **model_kwargs)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        if head.out_features != num_classes:
            parent = next(p for p in model.modules() if head in p.children())
            attr = next(k for k, v in parent.named_children() if v is head)
            setattr(parent, attr, nn.Linear(head.in_features, num_classes))
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **model_kwargs)
    if checkpoint:
        model.load_state_dict(load_state_dict_file(checkpoint))
    return model


def load_open_clip_embedder(arch: str, checkpoint: str | Path):
    """An open_clip model by architecture name with a local checkpoint file (safetensors or ``weights_only``
    torch files) or an open_clip pretrained tag (its own download and cache); returns (model, preprocess)."""
    import open_clip

    path = Path(checkpoint)
    if path.exists() or "/" in str(checkpoint) or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        _local_dir(path, "open_clip checkpoint")  # a path (not a tag) that is missing says so
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        model.load_state_dict(load_state_dict_file(checkpoint))
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint))
    return model.eval(), preprocess


# ---------------------------------------------------------------- tiny random models for tests and demos

@dataclass
class Models:
    """A bundle of models the sampler needs."""

    unet: nn.Module
    vae: nn.Module | None
    classifier: nn.Module
    scheduler: Any
    text_dim: int


def _random_models(*, num_classes: int, seed: int, unet_channels: tuple[int, ...], attn_levels: int,
                   text_dim: int, head_dim: int, groups: int, vae_channels: tuple[int, ...] | None,
                   latent_side: int, pixel_channels: int, classifier, image_embed_dim: int | None) -> Models:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(unet_channels)
    down = ("CrossAttnDownBlock2D",) * attn_levels + ("DownBlock2D",) * (levels - attn_levels)
    extra = {}
    if image_embed_dim:
        extra = dict(class_embed_type="projection", projection_class_embeddings_input_dim=image_embed_dim)
    channels = 4 if vae_channels else pixel_channels
    unet = UNet2DConditionModel(
        sample_size=latent_side, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=unet_channels, down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)), cross_attention_dim=text_dim,
        attention_head_dim=head_dim, norm_num_groups=groups, **extra)
    vae = None if vae_channels is None else AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), norm_num_groups=groups,
        sample_size=latent_side * 2 ** (len(vae_channels) - 1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    models = Models(unet, vae, classifier(), scheduler, text_dim=text_dim)
    freeze(models.unet, models.vae, models.classifier)
    return models


def tiny_models(*, num_classes: int = 10, seed: int = 0, image_embed_dim: int | None = None,
                pixel_space: bool = False) -> Models:
    """Tiny random UNet2DConditionModel (8x8x4 latents), AutoencoderKL (16x16 images), timm test_vit.

    ``image_embed_dim`` adds an unCLIP-style projection class embedding fed by ``class_labels``;
    ``pixel_space`` drops the VAE (the UNet then works on 16x16x3 images). Weights are random.
    """
    import timm

    # a smooth classifier (GELU, softmax, LayerNorm): a ReLU / max-pool one makes the feedback gradient
    # piecewise, and rounding-level differences can then cross a kink (seen: a 5.8% jump at one step)
    classifier = lambda: timm.create_model("test_vit", pretrained=False, num_classes=num_classes,  # noqa: E731
                                           img_size=16, patch_size=4, dynamic_img_size=False)
    return _random_models(num_classes=num_classes, seed=seed, unet_channels=(16, 32), attn_levels=1,
                          text_dim=16, head_dim=4, groups=8, vae_channels=None if pixel_space else (16, 32),
                          latent_side=16 if pixel_space else 8, pixel_channels=3, classifier=classifier,
                          image_embed_dim=image_embed_dim)


def small_models(*, num_classes: int = 10, seed: int = 0) -> Models:
    """Benchmark size: 12.8 M-parameter UNet on 16x16x4 latents, 3-level VAE (64x64 images), ResNet-18."""
    import timm

    classifier = lambda: timm.create_model("resnet18", pretrained=False, num_classes=num_classes)  # noqa: E731
    return _random_models(num_classes=num_classes, seed=seed, unet_channels=(64, 128, 256), attn_levels=2,
                          text_dim=256, head_dim=8, groups=32, vae_channels=(32, 64, 128), latent_side=16,
                          pixel_channels=3, classifier=classifier, image_embed_dim=None)


# ---------------------------------------------------------------- tiny random diffusers pipelines

TINY_TEXT_DIM, TINY_PROJ_DIM = 16, 6  # tiny text width = UNet cross-attention dim; image embedding width


def tiny_tokenizer(folder: str | Path):
    """A CLIPTokenizer over the 2 x 256 byte symbols of GPT-2's byte alphabet (no merges) and two specials,
    written to ``folder`` (no download)."""
    from transformers import CLIPTokenizer

    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


def tiny_pipeline(kind: str = "sd", *, seed: int = 0):
    """A tiny random diffusers pipeline (8x8x4 latents, 16x16 images, DDIM), no weights, no network.

    kind "sd": StableDiffusionPipeline (text). kind "unclip": StableUnCLIPImg2ImgPipeline whose UNet takes the
    noise-augmented CLIP image embedding (TINY_PROJ_DIM) plus its noise-level embedding as ``class_labels``.
    """
    import tempfile

    from diffusers import DDIMScheduler

    if kind not in ("sd", "unclip"):
        raise ValueError(f"tiny pipeline kind must be 'sd' or 'unclip', got {kind!r}")
    m = tiny_models(seed=seed, image_embed_dim=2 * TINY_PROJ_DIM if kind == "unclip" else None)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp)
    common = dict(vae=m.vae, text_encoder=_tiny_text_encoder(len(tok)), tokenizer=tok, unet=m.unet,
                  scheduler=DDIMScheduler.from_config(m.scheduler.config))
    if kind == "sd":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
        from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, projection_dim=TINY_PROJ_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)).eval()
        pipe = StableUnCLIPImg2ImgPipeline(
            **common, feature_extractor=CLIPImageProcessor(crop_size=16, size=16), image_encoder=vision,
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=TINY_PROJ_DIM),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_classifier(num_classes: int, *, seed: int = 0) -> nn.Module:
    """The tiny smooth ViT of ``tiny_models`` for 16x16 images, with random weights."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=16,
                              patch_size=4, dynamic_img_size=False)
    freeze(model)
    return model


def set_attention(mode: str, device: torch.device, *modules) -> str:
    """Put the attention of diffusers models on one backend: "sdpa" (torch's scaled_dot_product_attention),
    "xformers" (CUDA only, the optional extra) or "default" (leave the models as they are). Returns it."""
    if mode == "default":
        return mode
    if mode == "xformers":
        if device.type != "cuda":
            raise ValueError(f"attention 'xformers' needs a CUDA device (this one is {device.type}); "
                             "use 'sdpa'")
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention 'xformers' needs the xformers package: "
                             "pip install 'fgds-engine[xformers]'")
        for m in modules:
            if m is not None and hasattr(m, "enable_xformers_memory_efficient_attention"):
                m.enable_xformers_memory_efficient_attention()
        return mode
    if mode != "sdpa":
        raise ValueError(f"attention must be 'sdpa', 'xformers' or 'default', got {mode!r}")
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in modules:
        if m is not None and hasattr(m, "set_attn_processor"):
            m.set_attn_processor(AttnProcessor2_0())
    return mode
