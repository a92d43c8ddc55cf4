"""The guided DDIM step: CFG combine + feedback combine + DDIM update, behind one dispatch (the DDIM fast
path; other solvers take ``guide`` and their own update).

Backends (docs/design.md: chosen, never silently swapped):
    "torch"   ``formulas.guided_ddim_step``, the single source of truth for the others;
    "triton"  ``triton_step``, one fused kernel (two launches with a feedback gradient);
    "cuda"    the CUDA C++ library built from ``kernels/`` by CMake, loaded via ctypes (``cuda_lib``);
    "auto"    triton on CUDA devices when triton imports, torch otherwise (``resolve_backend`` says why).
Triton is imported only when the triton backend is first used, so that ``TRITON_INTERPRET`` set by a caller
before that still takes effect.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from ..config import BACKENDS
from . import common
from .formulas import (
    FEEDBACK_MODES,
    StepOptions,
    cfg_combine,
    combine_pushes,
    ddim_step,
    flow_alpha_bar,
    guide,
    guided_ddim_step,
    join_prediction,
    noise_coefficients,
    normalise_feedback,
    pipeline_cfg_combine,
    split_prediction,
)

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FEEDBACK_MODES", "StepOptions", "cfg_combine", "check_backend", "combine_pushes",
           "ddim_step", "flow_alpha_bar", "fused_guided_ddim_step", "guide", "guided_ddim_step",
           "join_prediction", "noise_coefficients", "normalise_feedback", "pipeline_cfg_combine",
           "resolve_backend",
           "split_prediction"]


def resolve_backend(backend: str, device: torch.device | str) -> tuple[str, str]:
    """(concrete backend, reason) for a requested backend on a device; raises on an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend, "requested"
    if torch.device(device).type != "cuda":
        return "torch", f"auto on {torch.device(device).type}: the fused kernels need a CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "torch", "auto on cuda: triton is not installed"
    return "triton", "auto on cuda: triton is installed"


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise ValueError, saying why, if a concrete backend cannot run on ``device`` (checked up front)."""
    from .common import interpreting

    device = torch.device(device)
    if name == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(f"backend 'triton' needs a CUDA device (this one is {device.type}), or "
                         "TRITON_INTERPRET=1 set before triton is imported; use backend 'auto' or 'torch'")
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs a CUDA device (this one is {device.type}); use 'auto' or "
                             "'torch'")
        from . import cuda_lib

        cuda_lib.load()  # CudaLibraryUnavailable (a RuntimeError) names the build command


def fused_guided_ddim_step(
    eps_u: torch.Tensor | None,
    eps_c: torch.Tensor,
    x: torch.Tensor,
    a_t,
    a_prev,
    opts: StepOptions | None = None,
    *,
    grad: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    return_x0: bool = True,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    backend: str = "auto",
    **changes,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CFG combine, feedback combine and DDIM update in one call on the chosen backend.

    Args:
        eps_u, eps_c: unconditional and conditional model outputs (eps_u None: no CFG), shaped like x.
        x: x_t, [B, ...] in fp32 / fp16 / bf16, contiguous or channels-last.
        a_t, a_prev: alpha-bars at t and at the previous timestep: floats, 0-d or [B] tensors.
        opts: a ``StepOptions`` (scales, feedback mode, prediction type, eta, clipping); keyword ``changes``
            of its fields (``guidance_scale=5.0``) apply on top.
        grad: dC/dx_t (None: no feedback); normalised per sample to ||x_t|| * feedback_scale.
        noise: eta > 0 needs the caller's noise, shaped like x.
        return_x0: False skips writing x0 (the sampler's loop does not need it: one output stream less).
        out: (x_prev, x0) buffers laid out like x to write into (static buffers for CUDA graphs).
        backend: "torch" | "triton" | "cuda" | "auto".
    Returns:
        (x_prev, x0) in the dtype of x (the fused backends also keep its memory format); x0 is None when
        return_x0 is false.
    """
    o = StepOptions.of(opts, **changes)
    name, _ = resolve_backend(backend, x.device)
    if name == "torch":
        x_prev, x0 = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, o, grad=grad, noise=noise)
        x0 = x0 if return_x0 else None
        if out is None:
            return x_prev, x0
        out[0].copy_(x_prev)
        if x0 is not None:
            out[1].copy_(x0)
        return out[0], out[1] if return_x0 else None
    packed = common.pack(eps_u, eps_c, x, a_t, a_prev, o, grad=grad, noise=noise, return_x0=return_x0)
    if name == "triton":
        from . import triton_step

        return triton_step.guided_ddim_step(packed, out=out)
    from . import cuda_lib

    return cuda_lib.guided_ddim_step(packed, out=out)
