"""ctypes loader of the CUDA C++ library of ``kernels/`` (``cmake -S . -B build && cmake --build build``).

The library is looked for at ``$FGDS_KERNELS_LIB``, then ``build/libfgds_kernels.so`` beside the package
checkout, then inside the package. A missing library raises ``CudaLibraryUnavailable`` with the build command;
the torch and triton backends work without it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .common import StepArgs

ABI_VERSION = 1
LIB_NAME = "libfgds_kernels.so"
BUILD_HINT = "build it with: cmake -S . -B build && cmake --build build (needs nvcc), or set FGDS_KERNELS_LIB"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCORE, CLIP, USE_CLIPPED = 1, 2, 4  # flags of fgds_kernels.h


class CudaLibraryUnavailable(RuntimeError):
    """The CUDA library of the fused step is not built or cannot be loaded."""


def candidates() -> list[Path]:
    """Where the library is looked for, in order."""
    paths = [Path(os.environ["FGDS_KERNELS_LIB"])] if os.environ.get("FGDS_KERNELS_LIB") else []
    root = Path(__file__).resolve().parents[2]
    return [*paths, root / "build" / LIB_NAME, Path(__file__).resolve().parent / LIB_NAME]


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The loaded library (cached); raises CudaLibraryUnavailable if it is missing or of another ABI."""
    tried = candidates()
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise CudaLibraryUnavailable(f"the CUDA library {LIB_NAME} was not found (looked at "
                                     f"{', '.join(map(str, tried))}); {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CudaLibraryUnavailable(f"the CUDA library {path} could not be loaded: {e}; {BUILD_HINT}") from e
    if lib.fgds_abi_version() != ABI_VERSION:
        raise CudaLibraryUnavailable(f"{path} has ABI version {lib.fgds_abi_version()}, this package needs "
                                     f"{ABI_VERSION}; rebuild it")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.fgds_blocks_per_sample.argtypes, lib.fgds_blocks_per_sample.restype = [i64], i64
    lib.fgds_error_string.argtypes, lib.fgds_error_string.restype = [i32], ctypes.c_char_p
    lib.fgds_guided_ddim_step.argtypes = [p] * 12 + [i64, i64, i32, i32, i32, i32, f32, f32, p]
    lib.fgds_guided_ddim_step.restype = i32
    return lib


def available() -> bool:
    """Whether the library loads (it can only run on a CUDA device)."""
    try:
        load()
    except CudaLibraryUnavailable:
        return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def guided_ddim_step(s: StepArgs, *, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the library's fused step on the current CUDA stream; returns (x_prev, x0)."""
    if s.x.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs tensors on a CUDA device, got {s.x.device}")
    lib = load()
    x_prev, x0 = s.check_out(out)
    ws = None
    if s.grad is not None:
        ws = torch.empty((s.batch, lib.fgds_blocks_per_sample(s.numel), 2), dtype=torch.float32,
                         device=s.x.device)
    flags = (SCORE if s.score else 0) | (CLIP if s.clip_sample else 0) | (
        USE_CLIPPED if s.use_clipped_model_output else 0)
    grad_dtype = DTYPE_CODES[s.grad.dtype] if s.grad is not None else 0
    stream = torch.cuda.current_stream(s.x.device).cuda_stream
    code = lib.fgds_guided_ddim_step(
        _ptr(s.eps_u), _ptr(s.eps_c), _ptr(s.x), _ptr(s.grad), _ptr(s.noise), _ptr(x_prev), _ptr(x0),
        _ptr(s.a_t), _ptr(s.a_prev), _ptr(s.guidance_scale), _ptr(s.feedback_scale), _ptr(ws),
        s.batch, s.numel, DTYPE_CODES[s.x.dtype], grad_dtype, s.pred, flags, s.eta, s.clip_sample_range,
        stream)
    if code != 0:
        raise RuntimeError(f"fgds_guided_ddim_step failed: {lib.fgds_error_string(code).decode()} ({code})")
    return x_prev, x0
