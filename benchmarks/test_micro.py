"""Micro-benchmarks under pytest-benchmark (``make bench-micro``; never part of ``make test``: no timing is
asserted, each case only checks its result before it is timed).

Groups: the fused guided DDIM step against the eager sequence of a diffusers loop (what bench_step.py times
by hand), per latent shape; image encoding per format and size (the write path's cost per image); the
hardness criterion's nll and its gradient at ImageNet-LT's scale of classes, low-rank statistics.

    python -m pytest benchmarks/test_micro.py --benchmark-json benchmarks/results/bench-micro-<device>.json
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from fgds_engine.bench import eager_step, smooth_image
from fgds_engine.class_stats import LowRankClassStats
from fgds_engine.ops import fused_guided_ddim_step
from fgds_engine.writers import Encoding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
SHAPES = {"sd15-256 b32": (32, 4, 32, 32), "sd15-512 b8": (8, 4, 64, 64)}


def _sync(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def sched():
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(30)
    return s


IMPLS = ["eager", "fused-torch"] + (["fused-triton"] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_guided_step(benchmark, sched, shape, impl):
    benchmark.group = f"guided DDIM step, feedback on, {shape}"
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c, x, grad = (torch.randn(SHAPES[shape], generator=g).to(DEVICE, DTYPE) for _ in range(4))
    t = int(sched.timesteps[10])
    a_t, a_prev = sched.alphas_cumprod[t].to(DEVICE), sched.alphas_cumprod[t - 1000 // 30].to(DEVICE)
    want = eager_step(sched, t, eps_u, eps_c, x, grad, w=5.0, scale=0.03)[0]
    if impl == "eager":
        fn = lambda: eager_step(sched, t, eps_u, eps_c, x, grad, w=5.0, scale=0.03)[0]  # noqa: E731
    else:
        fn = lambda: fused_guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, guidance_scale=5.0, grad=grad,  # noqa: E731
                                            feedback_scale=0.03, feedback_mode="shift",
                                            backend=impl.split("-")[1])[0]
    tol = 1e-4 if DTYPE == torch.float32 else 2e-2
    assert (fn().float() - want.float()).abs().max().item() < tol * want.float().abs().max().item()
    benchmark(_sync(fn))


@pytest.mark.parametrize("encoding", ["png-6", "png-1", "jpeg-95", "webp-95"])
@pytest.mark.parametrize("size", [256, 512])
def test_image_encoding(benchmark, size, encoding):
    benchmark.group = f"encode one {size} px image"
    fmt, level = encoding.split("-")
    enc = Encoding(fmt, png_level=int(level)) if fmt == "png" else Encoding(fmt, quality=int(level))
    image = smooth_image(size, 0)
    data = benchmark(enc.encode, image)
    assert len(data) > 1000
    benchmark.extra_info["bytes"] = len(data)


@pytest.mark.parametrize("classes,dim,rank", [(1000, 2048, 64)])
def test_hardness_nll_and_gradient(benchmark, classes, dim, rank):
    benchmark.group = "hardness nll + gradient, batch 32"
    g = torch.Generator().manual_seed(0)
    n = classes * 4
    feats = torch.randn(n, dim, generator=g)
    labels = torch.arange(n) % classes
    stats = LowRankClassStats.fit(feats, labels, classes, rank_cap=rank).to(DEVICE)
    z = torch.randn(32, dim, generator=g).to(DEVICE)
    y = torch.arange(32).to(DEVICE) * 31 % classes

    def nll_grad():
        zz = z.detach().requires_grad_()
        return torch.autograd.grad(stats.nll(zz, y).sum(), zz)[0]

    assert torch.isfinite(nll_grad()).all()
    benchmark(_sync(nll_grad))
