"""The call contracts every model meets (the sampler never knows which library a model comes from).

    denoiser_output(model, x, t, conditioning) -> prediction of a UNet or a transformer (``denoisers``)
    decode(vae, latents) -> images in about [-1, 1] (``vae=None``: pixel space, identity)
    Classifier(model)(images, with_features) -> logits, or (logits, penultimate features)
plus the mode, dtype and attention handling of the models a sampling call runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .denoisers import denoiser_output  # noqa: F401  (the contract's first call lives with its backbones)


def vae_scale_factor(vae: nn.Module | None) -> int:
    """Pixels per latent cell (1 in pixel space); a DC-AE (Sana) counts its encoder's blocks."""
    if vae is None:
        return 1
    cfg = vae.config
    blocks = getattr(cfg, "block_out_channels", None) or cfg.encoder_block_out_channels
    return 2 ** (len(blocks) - 1)


def decode(vae: nn.Module | None, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of latents, in the VAE's own dtype (an SDXL VAE kept in fp32 decodes fp16 latents in fp32),
    after the VAE's own scaling: ``latents / scaling_factor (+ shift_factor where the config has one: SD3,
    Flux)``, or ``latents * std / scaling_factor + mean`` where the config gives latent statistics. A DC-AE
    (Sana) decodes the same way. Identity in pixel space."""
    if vae is None:
        return latents
    cfg = vae.config
    dtype = next(vae.parameters()).dtype
    latents = latents.to(dtype)  # first, as the pipelines do (SDXL's upcast VAE, Sana's float32 latents)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:  # SD3, Flux
            latents = latents + cfg.shift_factor
    return vae.decode(latents, return_dict=False)[0]


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

def vae_dtype(vae: nn.Module | None, dtype: torch.dtype | None, *, upcast: bool) -> torch.dtype | None:
    """The dtype a VAE runs in for a run in ``dtype`` (None: as it is): float32 where it would be float16,
    ``upcast`` is asked (the SDXL family: its pipeline decodes in float32) and the VAE's config says
    ``force_upcast`` (the SDXL VAE overflows to NaN in float16), else ``dtype``. (diffusers' AutoencoderKL
    defaults to force_upcast=True, and the SD 1.x / 2.x pipelines ignore it: so does the engine.)"""
    if vae is None or not upcast:
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



# the models whose processors "sdpa" / "xformers" replace; a transformer of the SD3 / Flux / PixArt / Sana
# families (and Sana's DC-AE) has processors of its own that run torch's SDPA already: it keeps them
_REPLACEABLE = ("UNet2DConditionModel", "UNet2DModel", "AutoencoderKL")


def set_attention(mode: str, device: torch.device, *modules) -> str:
    """The attention of diffusers models: "keep" (leave their processors as they are; "default" is its old
    name), or an explicit request that replaces every processor of a UNet or AutoencoderKL in place: "sdpa"
    (``AttnProcessor2_0``, torch's scaled_dot_product_attention) or "xformers" (CUDA only, the optional
    extra). The transformer families' models keep their own processors (SDPA already). Returns it."""
    if mode in ("keep", "default"):
        return "keep"
    if mode not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'keep', 'sdpa' or 'xformers', got {mode!r}")
    modules = [m for m in modules
               if m is not None and any(k.__name__ in _REPLACEABLE for k in type(m).__mro__)]
    if mode == "xformers":
        if device.type != "cuda":
            raise ValueError(f"attention 'xformers' needs a CUDA device (this one is {device.type}); "
                             "use 'sdpa'")
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention 'xformers' needs the xformers package: "
                             "pip install 'fgds-engine[xformers]'")
        for m in modules:
            if hasattr(m, "enable_xformers_memory_efficient_attention"):
                m.enable_xformers_memory_efficient_attention()
        return mode
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in modules:
        if hasattr(m, "set_attn_processor"):
            m.set_attn_processor(AttnProcessor2_0())
    return mode
