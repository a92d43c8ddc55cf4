"""The denoiser contract: one call that gives the model's prediction for every backbone the families use.

    denoiser_output(model, x, t, cond) -> prediction shaped like x (eps / v / x0 / flow velocity)

``x`` is always the latents as the VAE sees them ([B, C, h, w]) and ``t`` the scheduler's timestep (a 0-d
tensor); each backbone gets them as its pipeline passes them:

    UNet2DConditionModel, UNet2DModel  unet(x, t, **kwargs)
    SD3Transformer2DModel              timestep t per row; pooled_projections
    FluxTransformer2DModel             x packed into 2x2 patches (a sequence), timestep t / 1000 per row,
                                       txt_ids / img_ids, guidance (guidance-distilled models); the output
                                       unpacked the same way, so a gradient flows through the same unpack
    PixArtTransformer2DModel           timestep t per row, encoder_attention_mask, resolution kwargs None
                                       (PixArt-Sigma's); learned sigma: the first C of 2C output channels
    SanaTransformer2DModel             timestep t * timestep_scale per row, encoder_attention_mask; learned
                                       sigma as PixArt

Latents in another dtype than the model's (Sana keeps float32 latents under a bf16 transformer) are cast to
the model's dtype for the call and the output back to theirs. The keyword arguments come from a
``Conditioning`` (its ``model_kwargs``), a dict of them, or the text
states alone. Any other module is called as a UNet.
"""

from __future__ import annotations

import torch
from torch import nn


def backbone(model: nn.Module) -> str:
    """The class name under which ``model`` is called (a subclass of a known backbone counts as it)."""
    for k in type(model).__mro__:
        if k.__name__ in _CALLS:
            return k.__name__
    return "UNet2DConditionModel"


def latent_channels(model: nn.Module) -> int:
    """Channels of the latents the VAE decodes (Flux's transformer takes them packed 2x2: in_channels / 4)."""
    c = model.config.in_channels
    return c // 4 if backbone(model) == "FluxTransformer2DModel" else c


def image_seq_len(model: nn.Module, latent_side: int) -> int:
    """The transformer's image sequence length for square latents of ``latent_side`` (the length a dynamic
    flow shift is computed from, as the SD3 / Flux pipelines do)."""
    if backbone(model) == "FluxTransformer2DModel":
        return (latent_side // 2) ** 2
    patch = getattr(model.config, "patch_size", 1) or 1
    return (latent_side // patch) ** 2


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h / 2)(w / 2), 4C]: Flux's packed latents (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_2x2`` for latents of side h x w (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = seq.shape
    x = seq.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def flux_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """Flux's position ids of an h2 x w2 grid of patches: (0, row, column) per patch."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def _kwargs(cond, class_labels) -> dict:
    if hasattr(cond, "model_kwargs"):
        return cond.model_kwargs()
    if isinstance(cond, dict):
        return dict(cond)
    pairs = (("encoder_hidden_states", cond), ("class_labels", class_labels))
    return {k: v for k, v in pairs if v is not None}


def _learned_sigma(model, out, x):
    return out[:, :x.shape[1]] if model.config.out_channels // 2 == x.shape[1] else out


def _unet(model, x, t, kw):
    return model(x, t, return_dict=False, **kw)[0]


def _sd3(model, x, t, kw):
    return model(hidden_states=x, timestep=t.expand(len(x)), return_dict=False, **kw)[0]


def _flux(model, x, t, kw):
    h, w = x.shape[-2:]
    states = kw["encoder_hidden_states"]
    txt_ids = torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype)
    out = model(hidden_states=pack_2x2(x), timestep=t.expand(len(x)).to(x.dtype) / 1000,
                guidance=kw.get("guidance"), pooled_projections=kw["pooled_projections"],
                encoder_hidden_states=states, txt_ids=txt_ids,
                img_ids=flux_image_ids(h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]
    return unpack_2x2(out, h, w)


def _pixart(model, x, t, kw):
    out = model(x, timestep=t.expand(len(x)), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False, **kw)[0]
    return _learned_sigma(model, out, x)


def _sana(model, x, t, kw):
    timestep = t.expand(len(x)) * model.config.timestep_scale
    return _learned_sigma(model, model(x, timestep=timestep, return_dict=False, **kw)[0], x)


_CALLS = {"UNet2DConditionModel": _unet, "UNet2DModel": _unet, "SD3Transformer2DModel": _sd3,
          "FluxTransformer2DModel": _flux, "PixArtTransformer2DModel": _pixart,
          "SanaTransformer2DModel": _sana}
TRANSFORMERS = tuple(n for n in _CALLS if n.endswith("Transformer2DModel"))


def denoiser_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond=None,
                    class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The prediction of a UNet or a transformer of the families for latents x ([B, C, h, w]) at timestep t.

    ``cond``: a ``Conditioning`` (its conditional half), the model's keyword arguments as a dict, or the
    text hidden states (``encoder_hidden_states``) with ``class_labels`` beside them.
    """
    call, kw = _CALLS[backbone(model)], _kwargs(cond, class_labels)
    dtype = getattr(model, "dtype", x.dtype)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != x.dtype:
        # latents kept in another dtype than the model's (Sana's float32 under bf16): the model sees its own
        # dtype, the loop gets the output back in the latents' (the pipeline's ``noise_pred.float()``)
        return call(model, x.to(dtype), t, kw).to(x.dtype)
    return call(model, x, t, kw)
