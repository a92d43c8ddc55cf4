"""The Triton fused step against the plain-torch reference (Liger-style: odd and prime shapes, batch 1, each
dtype with its own tolerance, NCHW and channels-last, outputs poisoned with NaN before every call).

Runs on a CUDA device, or on the CPU under Triton's interpreter, which must be switched on before triton is
imported, hence its own pytest invocation (``make test`` runs it):
    TRITON_INTERPRET=1 python -m pytest tests/test_ops_triton.py
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 set before triton is imported (make test runs "
                "this file in its own pytest invocation)", allow_module_level=True)

from conftest import assert_close  # noqa: E402

from fgds_engine.ops import common, fused_guided_ddim_step, guided_ddim_step, triton_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 4, 8, 8), (3, 4, 13, 11), (2, 3, 17, 19), (5, 1, 7, 3)]
# per-dtype tolerances: fp32 to rounding; fp16 / bf16 outputs are rounded to their dtype (about 1 ulp apart,
# a flip in the rounded x_t + g of the shift form amplified by up to 1 / sqrt(a_t) = 1.6 here)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (6e-3, 6e-3), torch.bfloat16: (5e-2, 5e-2)}
CASES = {  # name: options of the step
    "eps-cfg": dict(prediction_type="epsilon"),
    "eps-nocfg": dict(prediction_type="epsilon", uncond=False),
    "eps-shift-noise": dict(prediction_type="epsilon", mode="shift", eta=0.7),
    "eps-score-clip": dict(prediction_type="epsilon", mode="score", clip_sample=True, clip_sample_range=1.5),
    "sample-shift": dict(prediction_type="sample", mode="shift"),
    "sample-score-noise": dict(prediction_type="sample", mode="score", eta=1.0),
    "v-shift-clipped": dict(prediction_type="v_prediction", mode="shift", clip_sample=True,
                            use_clipped_model_output=True),
    "v-score": dict(prediction_type="v_prediction", mode="score", eta=0.3),
}


def make_inputs(shape, dtype, channels_last, *, seed=0, grad_dtype=None):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]

    def t(dt=dtype):
        v = torch.randn(shape, generator=g).to(DEVICE, dt)
        return v.contiguous(memory_format=torch.channels_last) if channels_last else v

    eps_u, eps_c, x, grad, noise = t(), t(), t(), t(grad_dtype or dtype), t()
    a_t = torch.linspace(0.4, 0.9, b).to(DEVICE)  # per-sample alpha-bars
    a_prev = torch.minimum(a_t + 0.07, torch.tensor(1.0)).to(DEVICE)
    return eps_u, eps_c, x, grad, noise, a_t, a_prev


def step_kwargs(case, grad, noise, b):
    kw = dict(guidance_scale=torch.linspace(1.5, 4.0, b).to(DEVICE), feedback_scale=0.05,
              prediction_type=case["prediction_type"], eta=case.get("eta", 0.0),
              clip_sample=case.get("clip_sample", False),
              clip_sample_range=case.get("clip_sample_range", 1.0),
              use_clipped_model_output=case.get("use_clipped_model_output", False))
    if "mode" in case:
        kw.update(grad=grad, feedback_mode=case["mode"])
    if kw["eta"] > 0:
        kw["noise"] = noise
    return kw


def run_poisoned(eps_u, eps_c, x, a_t, a_prev, **kw):
    """The triton launcher writing into NaN-filled outputs: an element it skips stays NaN and fails."""
    s = common.pack(eps_u, eps_c, x, a_t, a_prev, **{"grad": None, "feedback_mode": "shift",
                                                      "noise": None, **kw})
    out = (torch.full_like(s.x, float("nan")), torch.full_like(s.x, float("nan")))
    return triton_step.guided_ddim_step(s, out=out)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, channels_last, case):
    opts = CASES[case]
    eps_u, eps_c, x, grad, noise, a_t, a_prev = make_inputs(shape, dtype, channels_last)
    if not opts.get("uncond", True):
        eps_u = None
    kw = step_kwargs(opts, grad, noise, shape[0])
    want = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, **kw)
    got = run_poisoned(eps_u, eps_c, x, a_t, a_prev, **kw)
    atol, rtol = TOL[dtype]
    for name, g, w in zip(("x_prev", "x0"), got, want):
        assert g.dtype == dtype
        assert g.stride() == x.stride(), f"{name} lost the memory format of x"
        assert_close(g, w, atol=atol, rtol=rtol, name=f"{case} {name}")


@pytest.mark.parametrize("mode", ["shift", "score"])
def test_multi_block_reduction(mode):
    """Samples spanning many blocks: the per-sample norms are reduced across 24 programs per sample."""
    eps_u, eps_c, x, grad, noise, a_t, a_prev = make_inputs((2, 4, 37, 41), torch.float32, False, seed=3)
    grad[1] *= 1e-3  # a small gradient: the normalisation must make its push as large as sample 0's
    kw = dict(guidance_scale=3.0, grad=grad, feedback_scale=0.1, feedback_mode=mode)
    want = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, **kw)
    s = common.pack(eps_u, eps_c, x, a_t, a_prev, prediction_type="epsilon", eta=0.0, noise=None,
                    clip_sample=False, clip_sample_range=1.0, use_clipped_model_output=False, **kw)
    got = triton_step.guided_ddim_step(s, block=256)
    for g, w in zip(got, want):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=mode)


def test_fp16_latents_with_fp32_gradient():
    """An fp32 gradient is read as fp32 (no underflow from casting it to the latents' fp16)."""
    eps_u, eps_c, x, grad, _, a_t, a_prev = make_inputs((3, 4, 13, 11), torch.float16, False,
                                                       grad_dtype=torch.float32)
    grad = grad * 1e-9  # below fp16's smallest subnormal (6e-8): cast to fp16 it would be all zeros
    kw = dict(guidance_scale=2.0, grad=grad, feedback_scale=0.1, feedback_mode="score")
    want = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, **kw)
    got = fused_guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, backend="triton", **kw)
    no_fb = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, guidance_scale=2.0)
    assert (want[0].float() - no_fb[0].float()).abs().max() > 0.01  # the tiny gradient still pushes
    for g, w in zip(got, want):
        assert_close(g, w, atol=6e-3, rtol=6e-3, name="fp32 grad")


def test_scalar_and_per_sample_alphas_agree_and_reruns_are_bit_identical():
    eps_u, eps_c, x, grad, _, _, _ = make_inputs((4, 4, 9, 7), torch.float32, True)
    kw = dict(guidance_scale=3.0, grad=grad, feedback_scale=0.03)
    a = fused_guided_ddim_step(eps_u, eps_c, x, 0.5, 0.6, backend="triton", **kw)
    b = fused_guided_ddim_step(eps_u, eps_c, x, torch.full((4,), 0.5), torch.tensor(0.6), backend="triton",
                               **kw)
    c = fused_guided_ddim_step(eps_u, eps_c, x, 0.5, 0.6, backend="triton", **kw)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_inputs_in_mixed_layouts_are_brought_to_x_layout():
    eps_u, eps_c, x, grad, _, a_t, a_prev = make_inputs((2, 4, 11, 13), torch.float32, True)
    kw = dict(guidance_scale=3.0, grad=grad.contiguous(), feedback_scale=0.05, feedback_mode="shift")
    want = guided_ddim_step(eps_u.contiguous(), eps_c, x, a_t, a_prev, **kw)
    got = fused_guided_ddim_step(eps_u.contiguous(), eps_c, x, a_t, a_prev, backend="triton", **kw)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        assert_close(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["shift", "score"])
def test_sampler_on_triton_backend_matches_torch_backend(mode):
    """The whole loop (8 steps, feedback on 0/3/6, eta noise) with the fused kernel against the torch op
    (fp32; on the device the tests run on: the interpreter's CPU, or a GPU)."""
    from conftest import make_cond, rel_err

    from fgds_engine.models import tiny_models
    from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig

    m = tiny_models(num_classes=10, seed=0)
    for mod in (m.unet, m.vae, m.classifier):
        mod.to(DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        cfg = SamplerConfig.faithful(num_inference_steps=8, feedback_every=3, feedback_scale=0.1, eta=0.5,
                                     feedback_mode=mode)
        sampler = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg,
                                        runtime=RuntimeOptions(backend=backend, cuda_graphs=False))
        assert sampler.backend == backend
        outs[backend] = sampler.sample(make_cond(3), [0, 4, 7], [1, 2, 3])
    # CPU: the interpreter in fp32; a GPU adds TF32 convolutions and atomics in some backward kernels
    tol = 1e-5 if DEVICE == "cpu" else 1e-3
    for i in range(3):
        assert rel_err(outs["triton"].latents[i].cpu(), outs["torch"].latents[i].cpu()) < tol
        assert rel_err(outs["triton"].images[i].cpu(), outs["torch"].images[i].cpu()) < tol


def test_return_x0_false_writes_x_prev_only():
    eps_u, eps_c, x, grad, _, a_t, a_prev = make_inputs((3, 4, 13, 11), torch.float16, True)
    kw = dict(guidance_scale=3.0, grad=grad, feedback_scale=0.05)
    want = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, **kw)
    bufs = (torch.full_like(x, float("nan")), torch.full_like(x, float("nan")))
    x_prev, x0 = fused_guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, backend="triton", return_x0=False,
                                        out=bufs, **kw)
    assert x0 is None and x_prev is bufs[0]
    assert_close(x_prev, want[0], atol=6e-3, rtol=6e-3)
    assert torch.isnan(bufs[1]).all()  # x0 was not written
