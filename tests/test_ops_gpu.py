"""On a CUDA device: the CUDA library and the Triton kernel against the torch reference
(benchmarks/gpu_check.sh runs these with the library built)."""

import os

import pytest
import torch
from conftest import assert_close

from fgds_engine.ops import cuda_lib, fused_guided_ddim_step, guided_ddim_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (6e-3, 6e-3), torch.bfloat16: (5e-2, 5e-2)}
SHAPES = [(1, 4, 8, 8), (3, 4, 13, 11), (32, 4, 64, 64), (2, 4, 97, 61)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The device's share of the harvest goes to the benchmarks: each case below is one Triton compile at most
# (kernel variants: prediction type x feedback form x dtype x size specialisation), so the grid is cut in two
# rather than multiplied out: every prediction type and form at one shape and dtype, then every dtype,
# layout and shape (odd, prime, batch 1, many blocks per sample) at one prediction type and form.
CASES = ([(pred, mode, torch.float16, cl, (3, 4, 13, 11)) for pred in ("epsilon", "sample", "v_prediction")
          for mode in (None, "shift", "score") for cl in (False, True)]
         + [("epsilon", "shift", dt, cl, shape) for dt in DTYPES for cl in (False, True) for shape in SHAPES])


def case_id(case) -> str:
    pred, mode, dtype, cl, shape = case
    return f"{pred}-{mode}-{str(dtype)[6:]}-{'nhwc' if cl else 'nchw'}-{'x'.join(map(str, shape))}"


def backends():
    """triton, and cuda when the library is built; under the harvest (FGDS_REQUIRE_CUDA_LIB=1) a missing
    library fails the cuda tests instead of skipping them."""
    out = ["triton"]
    if cuda_lib.available() or os.environ.get("FGDS_REQUIRE_CUDA_LIB") == "1":
        out.append("cuda")
    return out


def inputs(shape, dtype, channels_last):
    g = torch.Generator().manual_seed(0)

    def t():
        v = torch.randn(shape, generator=g).to("cuda", dtype)
        return v.contiguous(memory_format=torch.channels_last) if channels_last else v

    b = shape[0]
    a_t = torch.linspace(0.4, 0.9, b, device="cuda")
    return t(), t(), t(), t(), t(), a_t, torch.clamp(a_t + 0.07, max=1.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_backends_match_reference_on_device(backend, case):
    if backend not in backends():
        pytest.skip("the CUDA library is not built (cmake -S . -B build && cmake --build build)")
    pred, mode, dtype, channels_last, shape = case
    eu, ec, x, grad, noise, a_t, a_prev = inputs(shape, dtype, channels_last)
    kw = dict(guidance_scale=torch.linspace(1.5, 4.0, shape[0], device="cuda"), prediction_type=pred,
              eta=0.5, noise=noise, clip_sample=pred == "sample")
    if mode:
        kw.update(grad=grad, feedback_scale=0.05, feedback_mode=mode)
    want = guided_ddim_step(eu, ec, x, a_t, a_prev, **kw)
    poisoned = tuple(torch.full_like(x, float("nan")) for _ in range(2))
    got = fused_guided_ddim_step(eu, ec, x, a_t, a_prev, backend=backend, out=poisoned, **kw)
    again = fused_guided_ddim_step(eu, ec, x, a_t, a_prev, backend=backend, **kw)
    atol, rtol = TOL[dtype]
    for name, g, w, r in zip(("x_prev", "x0"), got, want, again):
        assert g.stride() == x.stride()
        assert_close(g, w, atol=atol, rtol=rtol, name=f"{backend} {name}")  # fails on any unwritten NaN
        assert torch.equal(g, r), "reruns must be bit-identical"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_step_runs_under_graph_capture(backend):
    """No host sync inside the op: it captures, and the replay equals an eager call bit for bit."""
    if backend not in backends():
        pytest.skip("the CUDA library is not built")
    eu, ec, x, grad, _, a_t, a_prev = inputs((4, 4, 16, 16), torch.float16, False)
    kw = dict(guidance_scale=3.0, grad=grad, feedback_scale=0.03, backend=backend)
    want = fused_guided_ddim_step(eu, ec, x, a_t, a_prev, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_guided_ddim_step(eu, ec, x, a_t, a_prev, **kw)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_guided_ddim_step(eu, ec, x, a_t, a_prev, **kw)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(out, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_return_x0_false_on_device(backend):
    if backend not in backends():
        pytest.skip("the CUDA library is not built")
    eu, ec, x, grad, _, a_t, a_prev = inputs((3, 4, 13, 11), torch.bfloat16, True)
    kw = dict(guidance_scale=3.0, grad=grad, feedback_scale=0.05)
    want = guided_ddim_step(eu, ec, x, a_t, a_prev, **kw)
    bufs = (torch.full_like(x, float("nan")), torch.full_like(x, float("nan")))
    x_prev, x0 = fused_guided_ddim_step(eu, ec, x, a_t, a_prev, backend=backend, return_x0=False, out=bufs,
                                        **kw)
    assert x0 is None and torch.isnan(bufs[1]).all()
    assert_close(x_prev, want[0], atol=5e-2, rtol=5e-2)
