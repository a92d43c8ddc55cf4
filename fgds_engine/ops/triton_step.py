"""Triton kernel of the fused guided DDIM step (CFG combine + feedback combine + DDIM update).

Formula: ``fgds_engine/ops/formulas.py::guided_ddim_step`` (the single source of truth). Layout after
Liger-Kernel: private ``@triton.jit`` kernels, then the host launcher. Every latent is B rows of N elements in
storage order (NCHW or NHWC alike, see ``common.py``); the grid is (B, cdiv(N, BLOCK)).

With a feedback gradient, two launches: ``_sumsq_kernel`` writes per-block partial sums of x^2 and g^2 to an
fp32 [B, NBLK, 2] buffer, and ``_guided_ddim_fwd_kernel`` reduces its sample's partials in a fixed order
(deterministic, no atomics) before the elementwise update. Without one, a single launch. All arithmetic is
fp32; loads and stores are in the tensors' own dtypes.

On a machine without a GPU the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1`` before
``triton`` is first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import StepArgs, interpreting


@triton.jit
def _sumsq_kernel(X, G, P, N, NBLK, BLOCK: tl.constexpr):
    """P[b, j] = (sum x^2, sum g^2) over block j of sample b (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    xv = tl.load(X + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    gv = tl.load(G + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    p = P + (b * NBLK + j) * 2
    tl.store(p, tl.sum(xv * xv, axis=0))
    tl.store(p + 1, tl.sum(gv * gv, axis=0))


@triton.jit
def _guided_ddim_fwd_kernel(
    EU, EC, X, G, Z, XPREV, X0,  # latents: uncond / cond predictions, x_t, grad, eta noise; outputs
    A, AP, W, FS, P,  # per-sample fp32: a_t, a_prev, guidance scale, feedback scale; partial sums
    N, NBLK, eta, clip_range,
    HAS_UNCOND: tl.constexpr, HAS_GRAD: tl.constexpr, SCORE: tl.constexpr, HAS_NOISE: tl.constexpr,
    PRED: tl.constexpr, CLIP: tl.constexpr, USE_CLIPPED: tl.constexpr, STORE_X0: tl.constexpr,
    NBLK_P2: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one sample: x_prev and x0 of eq. 12 of DDIM, with CFG and feedback folded in."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = b * N
    a = tl.load(A + b)  # a = alpha-bar_t
    ap = tl.load(AP + b)  # alpha-bar_{t-1}
    sa = tl.sqrt_rn(a)
    s1a = tl.sqrt_rn(1.0 - a)

    # classifier-free guidance: out = eps_u + w (eps_c - eps_u)
    out = tl.load(EC + row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        eu = tl.load(EU + row + offs, mask=mask, other=0.0).to(tl.float32)
        out = eu + tl.load(W + b) * (out - eu)

    # feedback: g = grad / (||grad|| + 1e-8) * ||x_t|| * scale, per sample
    xv = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD:
        pj = tl.arange(0, NBLK_P2)
        pm = pj < NBLK
        sxx = tl.sum(tl.load(P + (b * NBLK + pj) * 2, mask=pm, other=0.0), axis=0)
        sgg = tl.sum(tl.load(P + (b * NBLK + pj) * 2 + 1, mask=pm, other=0.0), axis=0)
        fac = tl.sqrt_rn(sxx) / (tl.sqrt_rn(sgg) + 1e-8) * tl.load(FS + b)
        g = tl.load(G + row + offs, mask=mask, other=0.0).to(tl.float32) * fac
        if not SCORE:  # shift form: the update runs from x_t + g, stored in x's dtype as the reference does
            xv = (xv + g).to(X.dtype.element_ty).to(tl.float32)

    # (x0, eps) from the model output of the prediction type
    if PRED == 0:  # epsilon
        x0 = (xv - s1a * out) / sa
        eps = out
    elif PRED == 1:  # sample
        x0 = out
        eps = (xv - sa * out) / s1a
    else:  # v_prediction
        x0 = sa * xv - s1a * out
        eps = sa * out + s1a * xv
    if HAS_GRAD:
        if SCORE:  # score form: eps' = eps - sqrt(1 - a) g, x0 re-derived
            eps = eps - s1a * g
            x0 = (xv - s1a * eps) / sa
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    # eq. 16 of DDIM: sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)
    std = eta * tl.sqrt_rn((1.0 - ap) / (1.0 - a) * (1.0 - a / ap))
    if USE_CLIPPED:
        eps = (xv - sa * x0) / s1a
    # eq. 12 of DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    xp = tl.sqrt_rn(ap) * x0 + tl.sqrt_rn(1.0 - ap - std * std) * eps
    if HAS_NOISE:
        xp = xp + std * tl.load(Z + row + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(XPREV + row + offs, xp.to(XPREV.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(X0 + row + offs, x0.to(X0.dtype.element_ty), mask=mask)


def default_block(numel: int, device: torch.device) -> int:
    """Elements per program: 1024 on a GPU; under the interpreter, the whole sample (up to 2^16)."""
    if device.type == "cuda":
        return 1024
    return min(triton.next_power_of_2(numel), 1 << 16)


def guided_ddim_step(s: StepArgs, *, out=None, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused step on packed arguments; returns (x_prev, x0) in x's dtype and memory format
    (x0 None when ``s.return_x0`` is false: it is then not written at all)."""
    if s.x.device.type != "cuda" and not interpreting():
        raise RuntimeError("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                           "is imported to run on the CPU")
    x_prev, x0 = s.check_out(out)
    n, blk = s.numel, block or default_block(s.numel, s.x.device)
    nblk = triton.cdiv(n, blk)
    grid = (s.batch, nblk)
    warps = 4 if blk <= 1024 else 8
    partials = s.x  # placeholder pointer when there is no gradient (never read)
    if s.grad is not None:
        partials = torch.empty((s.batch, nblk, 2), dtype=torch.float32, device=s.x.device)
        _sumsq_kernel[grid](s.x, s.grad, partials, n, nblk, BLOCK=blk, num_warps=warps)
    _guided_ddim_fwd_kernel[grid](
        s.eps_u if s.eps_u is not None else s.eps_c, s.eps_c, s.x,
        s.grad if s.grad is not None else s.x, s.noise if s.noise is not None else s.x, x_prev,
        x0 if x0 is not None else x_prev,
        s.a_t, s.a_prev, s.guidance_scale, s.feedback_scale, partials,
        n, nblk, s.eta, s.clip_sample_range,
        HAS_UNCOND=s.eps_u is not None, HAS_GRAD=s.grad is not None, SCORE=s.score,
        HAS_NOISE=s.noise is not None, PRED=s.pred, CLIP=s.clip_sample,
        USE_CLIPPED=s.use_clipped_model_output, STORE_X0=x0 is not None,
        NBLK_P2=triton.next_power_of_2(nblk), BLOCK=blk, num_warps=warps,
    )
    return x_prev, x0
