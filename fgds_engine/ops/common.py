"""Host-side checks and argument packing shared by the fused backends (Triton, CUDA library).

The fused kernels see every latent as B contiguous rows of N = C*H*W elements in storage order, which holds
for NCHW-contiguous and channels-last (NHWC) tensors alike: the op is elementwise apart from per-sample
reductions, so the memory format only has to be the same for every input. Per-sample scalars (alpha-bars,
guidance and feedback scales) become fp32 [B] tensors on the device, so a launch needs no host sync and can be
captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .formulas import FEEDBACK_MODES, StepOptions

PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class StepArgs:
    """Everything one fused launch needs, checked and laid out alike."""

    eps_u: torch.Tensor | None
    eps_c: torch.Tensor
    x: torch.Tensor
    grad: torch.Tensor | None
    noise: torch.Tensor | None
    a_t: torch.Tensor  # fp32 [B]
    a_prev: torch.Tensor  # fp32 [B]
    guidance_scale: torch.Tensor  # fp32 [B]
    feedback_scale: torch.Tensor  # fp32 [B]
    batch: int
    numel: int  # N, elements per sample
    pred: int  # PREDICTION_CODES
    score: bool
    eta: float
    clip_sample: bool
    clip_sample_range: float
    use_clipped_model_output: bool
    return_x0: bool = True

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fresh (x_prev, x0) in the dtype and memory format of x (x0 None unless return_x0)."""
        return torch.empty_like(self.x), torch.empty_like(self.x) if self.return_x0 else None

    def check_out(self, out) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caller-provided outputs (static buffers, e.g. for CUDA graphs): laid out like x, or fresh ones."""
        if out is None:
            return self.outputs()
        x_prev, x0 = out
        for name, t in (("x_prev", x_prev), ("x0", x0)):
            if t is not None and (t.shape != self.x.shape or t.dtype != self.x.dtype
                                  or t.stride() != self.x.stride() or t.device != self.x.device):
                raise ValueError(f"out {name} must match x in shape, dtype, memory layout and device")
        if self.return_x0 and x0 is None:
            raise ValueError("out needs an x0 buffer when return_x0 is true")
        return x_prev, x0 if self.return_x0 else None


def per_sample(v, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A float, a 0-d / 1-element tensor or a [B] tensor as a contiguous fp32 [B] tensor on ``device``."""
    if not isinstance(v, torch.Tensor):
        return torch.full((batch,), float(v), dtype=torch.float32, device=device)
    v = v.to(device=device, dtype=torch.float32).reshape(-1)
    if v.numel() not in (1, batch):
        raise ValueError(f"{name} must be a scalar or have one value per sample ({batch}), got {v.numel()}")
    return v.expand(batch).contiguous()


def _like_x(t: torch.Tensor | None, x: torch.Tensor, name: str, *, keep_dtype: bool = False):
    """t with the shape, memory layout (and unless keep_dtype, dtype) of x; a copy only where they differ."""
    if t is None:
        return None
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not keep_dtype or t.dtype not in FUSED_DTYPES:
        t = t.to(x.dtype)
    if t.stride() != x.stride():
        fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
        t = t.contiguous(memory_format=fmt)
    return t


def pack(eps_u, eps_c, x, a_t, a_prev, opts: StepOptions | None = None, *, grad=None, noise=None,
         return_x0: bool = True, **changes) -> StepArgs:
    """Check the arguments of a fused guided DDIM step (``StepOptions`` plus keyword changes of its fields)
    and lay them out for a kernel."""
    o = StepOptions.of(opts, **changes)
    if x.dtype not in FUSED_DTYPES:
        raise ValueError(f"the fused step supports float32, float16 and bfloat16 latents, got {x.dtype}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty batch of latents [B, ...], got shape {tuple(x.shape)}")
    if o.prediction_type not in PREDICTION_CODES:
        raise NotImplementedError(f"prediction_type {o.prediction_type!r} is not supported")
    if o.feedback_mode not in FEEDBACK_MODES:
        raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODES}, got {o.feedback_mode!r}")
    if o.eta > 0 and noise is None:
        raise ValueError("eta > 0 needs the caller's noise (one tensor shaped like x)")
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        x = x.contiguous()
    b, dev = x.shape[0], x.device
    return StepArgs(
        eps_u=_like_x(eps_u, x, "eps_u"), eps_c=_like_x(eps_c, x, "eps_c"), x=x,
        grad=_like_x(grad, x, "grad", keep_dtype=True),
        noise=_like_x(noise, x, "noise") if o.eta > 0 else None,
        a_t=per_sample(a_t, b, dev, "a_t"), a_prev=per_sample(a_prev, b, dev, "a_prev"),
        guidance_scale=per_sample(o.guidance_scale, b, dev, "guidance_scale"),
        feedback_scale=per_sample(o.feedback_scale, b, dev, "feedback_scale"),
        batch=b, numel=x[0].numel(), pred=PREDICTION_CODES[o.prediction_type],
        score=o.feedback_mode == "score", eta=float(o.eta), clip_sample=bool(o.clip_sample),
        clip_sample_range=float(o.clip_sample_range),
        use_clipped_model_output=bool(o.use_clipped_model_output),
        return_x0=bool(return_x0))


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
