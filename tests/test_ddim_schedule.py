"""DDIMSchedule + ops.formulas.ddim_step against diffusers' DDIMScheduler.step over a grid of configs."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from fgds_engine.ops.formulas import ddim_step
from fgds_engine.solvers.ddim_schedule import DDIMSchedule

GRID = list(itertools.product(
    ["leading", "trailing", "linspace"],
    ["epsilon", "v_prediction", "sample"],
    [0.0, 0.7],
    [False, True],          # clip_sample
    [True, False],          # set_alpha_to_one
))


def _close(a, b, tol=1e-6):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.double().abs().max().item()), f"max abs err {err:.3e}"


@pytest.mark.parametrize("spacing,pred,eta,clip,one", GRID)
def test_step_matches_diffusers(spacing, pred, eta, clip, one):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
               prediction_type=pred, clip_sample=clip, set_alpha_to_one=one, steps_offset=1,
               clip_sample_range=1.5)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(13)
    ours = DDIMSchedule.from_config(ref.config, 13)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 7, generator=g)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(x.shape, generator=g)
        noise = torch.randn(x.shape, generator=g)
        want = ref.step(out, t, x, eta=eta, variance_noise=noise if eta else None)
        a_t, a_prev = ours.alphas(i)
        got, x0 = ddim_step(out, x, a_t, a_prev, prediction_type=pred, eta=eta, noise=noise,
                            clip_sample=clip, clip_sample_range=1.5)
        _close(got, want.prev_sample)
        _close(x0, want.pred_original_sample)
        x = want.prev_sample


@pytest.mark.parametrize("schedule,zero_snr", [("linear", False), ("squaredcos_cap_v2", False),
                                               ("scaled_linear", True)])
def test_betas_and_zero_snr(schedule, zero_snr):
    cfg = dict(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing",
               prediction_type="v_prediction" if zero_snr else "epsilon", clip_sample=False)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(30)
    ours = DDIMSchedule.from_config(ref, 30)
    _close(ours.alphas_cumprod, ref.alphas_cumprod, 0)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_use_clipped_model_output():
    ref = DDIMScheduler(clip_sample=True)
    ref.set_timesteps(10)
    ours = DDIMSchedule.from_config(ref, 10)
    x, out = torch.randn(1, 3, 4, 4) * 3, torch.randn(1, 3, 4, 4)
    want = ref.step(out, ref.timesteps[2], x, eta=0.0, use_clipped_model_output=True).prev_sample
    got, _ = ddim_step(out, x, *ours.alphas(2), clip_sample=True, use_clipped_model_output=True)
    _close(got, want)


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="dynamic thresholding is not supported"):
        DDIMSchedule.from_config(DDIMScheduler(thresholding=True), 10)
    with pytest.raises(ValueError, match="num_inference_steps must be in 1..1000, got 0"):
        DDIMSchedule.from_config(DDIMScheduler(), 0)
    with pytest.raises(ValueError, match="eta > 0 needs the caller's noise"):
        ddim_step(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor(0.5), torch.tensor(0.6), eta=1.0)
