"""FusedDDIMScheduler against diffusers' DDIMScheduler, after diffusers' common scheduler tests: config round
trip, output shape, tuple vs dataclass, step-by-step equality over a grid of configs, and a real client."""

import itertools
import re

import pytest
import torch
from conftest import rel_err
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fgds_engine.dropin_scheduler import FusedDDIMScheduler
from fgds_engine.ops import guided_ddim_step

SHAPE = (2, 4, 8, 8)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet output that depends on x and t."""
    return 0.4 * x + 0.3 * torch.sin(x * 3 + float(t) / 100)


def pair(**cfg):
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    ref = DDIMScheduler(**{**base, **cfg})
    return ref, FusedDDIMScheduler.from_config(ref.config)


def sample(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


GRID = list(itertools.product(["epsilon", "sample", "v_prediction"], ["leading", "trailing", "linspace"],
                              [False, True], [False, True], [0.0, 0.6], [False, True]))


@pytest.mark.parametrize("pred,spacing,clip,alpha_one,eta,clipped", GRID)
def test_full_loop_equals_ddim_scheduler(pred, spacing, clip, alpha_one, eta, clipped):
    ref, fused = pair(prediction_type=pred, timestep_spacing=spacing, clip_sample=clip,
                      set_alpha_to_one=alpha_one, steps_offset=1 if spacing == "leading" else 0)
    for s in (ref, fused):
        s.set_timesteps(10)
    assert torch.equal(ref.timesteps, fused.timesteps)
    x_ref = x_fused = sample()
    g_ref, g_fused = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        out_ref = ref.step(fake_model(x_ref, t), t, x_ref, eta=eta, use_clipped_model_output=clipped,
                           generator=g_ref)
        out_fused = fused.step(fake_model(x_fused, t), t, x_fused, eta=eta, use_clipped_model_output=clipped,
                               generator=g_fused)
        assert rel_err(out_fused.pred_original_sample, out_ref.pred_original_sample) < 2e-6
        x_ref, x_fused = out_ref.prev_sample, out_fused.prev_sample
        assert rel_err(x_fused, x_ref) < 2e-6, f"step t={int(t)}"


def test_output_shape_and_tuple_equals_dataclass():
    _, fused = pair()
    fused.set_timesteps(10)
    x = sample()
    t = fused.timesteps[3]
    out = fused.step(fake_model(x, t), t, x)
    tup = fused.step(fake_model(x, t), t, x, return_dict=False)
    assert isinstance(out, DDIMSchedulerOutput) and isinstance(tup, tuple) and len(tup) == 2
    assert out.prev_sample.shape == out.pred_original_sample.shape == SHAPE
    assert torch.equal(out.prev_sample, tup[0]) and torch.equal(out.pred_original_sample, tup[1])


def test_config_round_trip(tmp_path):
    _, fused = pair(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    fused.save_config(tmp_path)
    loaded = FusedDDIMScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded, FusedDDIMScheduler)
    public = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded) == public(fused)
    back = DDIMScheduler.from_config(loaded.config)  # and the other way round
    assert public(back) == public(fused)


def test_variance_noise_and_generator_conflict_and_missing_timesteps():
    ref, fused = pair()
    x = sample()
    for s in (ref, fused):  # the same messages as DDIMScheduler
        with pytest.raises(ValueError, match=re.escape("you need to run 'set_timesteps'")):
            s.step(x, 500, x)
        s.set_timesteps(10)
        with pytest.raises(ValueError, match=re.escape("Cannot pass both generator and variance_noise.")):
            s.step(x, 501, x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    a = ref.step(x, 501, x, eta=0.5, variance_noise=x * 0.5).prev_sample
    b = fused.step(x, 501, x, eta=0.5, variance_noise=x * 0.5).prev_sample
    assert rel_err(b, a) < 2e-6


def test_thresholding_defers_to_ddim_scheduler():
    ref, fused = pair(thresholding=True, prediction_type="sample")
    for s in (ref, fused):
        s.set_timesteps(10)
    x = sample() * 3
    assert torch.equal(fused.step(x, 501, x).prev_sample, ref.step(x, 501, x).prev_sample)
    message = "dynamic thresholding is not supported by the fused guided step"
    with pytest.raises(NotImplementedError, match=message):
        fused.guided_step(x, x, 501, x, guidance_scale=2.0)


def test_fp16_sample_close_to_diffusers():
    ref, fused = pair()
    for s in (ref, fused):
        s.set_timesteps(10)
    x = sample(dtype=torch.float16)
    a = ref.step(fake_model(x, 501), 501, x).prev_sample
    b = fused.step(fake_model(x, 501), 501, x).prev_sample
    assert b.dtype == torch.float16
    assert rel_err(b, a) < 2e-3  # diffusers computes in fp16, the fused step in fp32 then rounds


def test_guided_step_equals_reference_formula():
    _, fused = pair()
    fused.set_timesteps(10)
    eu, ec, x, grad = sample(1), sample(2), sample(3), sample(4)
    t = int(fused.timesteps[2])
    a_t, a_prev = fused.alphas_cumprod[t], fused.alphas_cumprod[t - 100]
    for mode in ("shift", "score"):
        got = fused.guided_step(eu, ec, t, x, guidance_scale=5.0, grad=grad, feedback_scale=0.03,
                                feedback_mode=mode, return_dict=False)
        want = guided_ddim_step(eu, ec, x, a_t, a_prev, guidance_scale=5.0, grad=grad, feedback_scale=0.03,
                                feedback_mode=mode, clip_sample=True)  # DDIMScheduler's default
        for g, w in zip(got, want):
            assert torch.equal(g, w)  # the torch backend on the CPU is the reference itself


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_stable_diffusion_pipeline_with_fused_scheduler(tmp_path, eta):
    """A real client: the same images with FusedDDIMScheduler as with DDIMScheduler (fp32, 1e-5 abs)."""
    from fgds_engine.models import tiny_pipeline

    pipe = tiny_pipeline("sd")
    images = {}
    for cls in (DDIMScheduler, FusedDDIMScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        images[cls] = pipe(["a red cat", "a dog"], num_inference_steps=10, guidance_scale=4.0, eta=eta,
                           generator=gens, output_type="pt").images
    assert isinstance(pipe.scheduler, FusedDDIMScheduler)
    assert (images[FusedDDIMScheduler] - images[DDIMScheduler]).abs().max() < 1e-5
    assert images[DDIMScheduler].std() > 0.01  # not a blank image
