"""The call contracts every model meets (the sampler never knows which library a model comes from).

    unet_eps(unet, x, t, the UNet's keyword arguments) -> model output (eps / v / x0)
    decode(vae, latents) -> images in about [-1, 1] (``vae=None``: pixel space, identity)
    Classifier(model)(images, with_features) -> logits, or (logits, penultimate features)
plus the mode, dtype and attention handling of the models a sampling call runs.
"""

from __future__ import annotations

import contextlib

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



def set_attention(mode: str, device: torch.device, *modules) -> str:
    """The attention of diffusers models: "keep" (leave their processors as they are; "default" is its old
    name), or an explicit request that replaces every processor in place: "sdpa" (``AttnProcessor2_0``,
    torch's scaled_dot_product_attention) or "xformers" (CUDA only, the optional extra). Returns it."""
    if mode in ("keep", "default"):
        return "keep"
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
        raise ValueError(f"attention must be 'keep', 'sdpa' or 'xformers', got {mode!r}")
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in modules:
        if m is not None and hasattr(m, "set_attn_processor"):
            m.set_attn_processor(AttnProcessor2_0())
    return mode
