"""The step dispatch, argument checks and the CUDA-library loader (the kernels' numbers: test_ops_triton.py,
and on a GPU test_ops_gpu.py)."""

import re

import pytest
import torch

from fgds_engine.ops import common, cuda_lib, fused_guided_ddim_step, guided_ddim_step, resolve_backend


def inputs(shape=(2, 4, 5, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


def test_auto_is_torch_on_cpu_and_says_why():
    assert resolve_backend("auto", "cpu") == ("torch", "auto on cpu: the fused kernels need a CUDA device")
    assert resolve_backend("triton", "cpu") == ("triton", "requested")


def test_unknown_backend():
    message = "backend must be one of ('torch', 'triton', 'cuda', 'auto'), got 'numba'"
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_backend("numba", "cpu")


def test_torch_backend_is_the_reference_bit_for_bit():
    eu, ec, x, g = inputs()
    kw = dict(guidance_scale=3.0, grad=g, feedback_scale=0.1, feedback_mode="score",
              prediction_type="v_prediction")
    for u, v in zip(fused_guided_ddim_step(eu, ec, x, 0.4, 0.5, backend="torch", **kw),
                    guided_ddim_step(eu, ec, x, 0.4, 0.5, **kw)):
        assert torch.equal(u, v)


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    eu, ec, x, _ = inputs()
    with pytest.raises(RuntimeError, match=re.escape("the triton backend needs a CUDA device, or "
                                                     "TRITON_INTERPRET=1 set before triton is imported")):
        fused_guided_ddim_step(eu, ec, x, 0.4, 0.5, backend="triton")


def test_cuda_backend_needs_cuda_tensors():
    eu, ec, x, _ = inputs()
    with pytest.raises(RuntimeError, match="the cuda backend needs tensors on a CUDA device, got cpu"):
        fused_guided_ddim_step(eu, ec, x, 0.4, 0.5, backend="cuda")


@pytest.mark.parametrize(("kw", "message"), [
    (dict(eps_c=torch.zeros(2, 4, 5, 2)), "eps_c has shape (2, 4, 5, 2) but x has (2, 4, 5, 3)"),
    (dict(a_t=torch.ones(3)), "a_t must be a scalar or have one value per sample (2), got 3"),
    (dict(eta=0.5), "eta > 0 needs the caller's noise (one tensor shaped like x)"),
    (dict(prediction_type="flow"), "prediction_type 'flow' is not supported"),
    (dict(feedback_mode="push"), "feedback_mode must be one of ('shift', 'score'), got 'push'"),
    (dict(x=torch.zeros(2, 4, 5, 3, dtype=torch.float64)),
     "the fused step supports float32, float16 and bfloat16 latents, got torch.float64"),
])
def test_pack_rejects_bad_input(kw, message):
    eu, ec, x, _ = inputs()
    args = dict(eps_u=eu, eps_c=ec, x=x, a_t=0.4, a_prev=0.5, guidance_scale=2.0, grad=None,
                feedback_scale=0.0, feedback_mode="shift", prediction_type="epsilon", eta=0.0, noise=None,
                clip_sample=False, clip_sample_range=1.0, use_clipped_model_output=False)
    args.update(kw)
    with pytest.raises((ValueError, NotImplementedError), match=re.escape(message)):
        common.pack(**args)


def test_pack_lays_out_inputs_like_x():
    eu, ec, x, g = inputs()
    x = x.contiguous(memory_format=torch.channels_last)
    s = common.pack(eu, ec.half(), x, torch.tensor(0.4), torch.tensor([0.5, 0.6]),
                    guidance_scale=3, grad=g.half(), feedback_scale=0.1, feedback_mode="shift",
                    prediction_type="sample", eta=0.0, noise=g, clip_sample=True, clip_sample_range=2.0,
                    use_clipped_model_output=False)
    assert s.eps_u.stride() == s.eps_c.stride() == s.grad.stride() == x.stride()
    assert s.eps_c.dtype == torch.float32 and s.grad.dtype == torch.float16  # the gradient keeps its dtype
    assert s.noise is None  # eta = 0: the noise is not read
    assert s.a_t.tolist() == pytest.approx([0.4, 0.4]) and s.a_prev.tolist() == pytest.approx([0.5, 0.6])
    assert s.guidance_scale.tolist() == [3.0, 3.0] and (s.batch, s.numel, s.pred) == (2, 60, 1)


def test_missing_cuda_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_lib, "candidates", lambda: [tmp_path / "libfgds_kernels.so"])
    cuda_lib.load.cache_clear()
    try:
        lib = tmp_path / "libfgds_kernels.so"
        message = (f"the CUDA library libfgds_kernels.so was not found (looked at {lib}); "
                   "build it with: cmake -S . -B build && cmake --build build")
        with pytest.raises(cuda_lib.CudaLibraryUnavailable, match=re.escape(message)):
            cuda_lib.load()
        assert not cuda_lib.available()
    finally:
        cuda_lib.load.cache_clear()


def test_built_cuda_library_loads_with_its_abi():
    """Runs where `cmake --build build` has run (make test builds it when nvcc is present)."""
    if not cuda_lib.available():
        pytest.skip("the CUDA library is not built here (no nvcc, or cmake not run)")
    lib = cuda_lib.load()
    assert lib.fgds_block_elems() == 1024
    assert [lib.fgds_blocks_per_sample(n) for n in (1, 1024, 1025, 16384)] == [1, 1, 2, 16]
    assert lib.fgds_error_string(1).decode() == "invalid argument"


def test_out_buffers_on_the_torch_backend_and_their_checks():
    eu, ec, x, g = inputs()
    kw = dict(guidance_scale=2.0, grad=g, feedback_scale=0.1)
    want = guided_ddim_step(eu, ec, x, 0.4, 0.5, **kw)
    bufs = (torch.empty_like(x), torch.empty_like(x))
    got = fused_guided_ddim_step(eu, ec, x, 0.4, 0.5, backend="torch", out=bufs, **kw)
    assert got[0] is bufs[0] and torch.equal(got[0], want[0]) and torch.equal(bufs[1], want[1])
    assert fused_guided_ddim_step(eu, ec, x, 0.4, 0.5, backend="torch", return_x0=False, **kw)[1] is None
    s = common.pack(eu, ec, x, 0.4, 0.5, guidance_scale=2.0, grad=None, feedback_scale=0.0,
                    feedback_mode="shift", prediction_type="epsilon", eta=0.0, noise=None, clip_sample=False,
                    clip_sample_range=1.0, use_clipped_model_output=False)
    message = "out x_prev must match x in shape, dtype, memory layout and device"
    with pytest.raises(ValueError, match=re.escape(message)):
        s.check_out((torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(x)))
    with pytest.raises(ValueError, match=re.escape("out needs an x0 buffer when return_x0 is true")):
        s.check_out((torch.empty_like(x), None))
