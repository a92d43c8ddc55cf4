"""Loaders of local folders and files through the libraries' own: diffusers ``from_pretrained``, timm
``create_model``, torchvision, open_clip's factory. A checkpoint file is read safely (safetensors, or
``torch.load(weights_only=True)``). (Whole pipelines, folder or hub id: ``assemble.load_pipeline``.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


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
