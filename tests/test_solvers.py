"""The scheduler contract: every scheduler a diffusers user runs, one row each (as diffusers'
``SchedulerCommonTest``). Each row: equal to the pipeline's own call with feedback off, equal to the
per-sample reference with feedback on, a sample in a batch equal to the sample alone, the graph stand-in
equal to eager, and feedback actually moving the samples."""

import re

import pytest
import torch
from conftest import NUM_CLASSES, make_cond, rel_err

from fgds_engine.graphs import EagerStandIn, StepGraphs
from fgds_engine.models import tiny_models, tiny_pipeline
from fgds_engine.reference_loop import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
from fgds_engine.solvers import FLOW_SCHEDULER_NAMES, SCHEDULERS, resolve_scheduler

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog"], [1, 4], [21, 22]
STEPS = 6
PIPE_TOL = 1e-5  # max abs difference of [0, 1] images, fp32 on the CPU (measured: 0, bit-equal)
TOL = 1e-4  # relative error, fp32 on the CPU: batched vs per-sample differ only by rounding
ROWS = {  # scheduler name -> (the feedback form "auto" gives, the diffusers class)
    "ddim": ("shift", "DDIMScheduler"),
    "ddpm": ("shift", "DDPMScheduler"),
    "euler": ("shift", "EulerDiscreteScheduler"),
    "euler-a": ("shift", "EulerAncestralDiscreteScheduler"),
    "pndm": ("score", "PNDMScheduler"),
    "lms": ("score", "LMSDiscreteScheduler"),
    "heun": ("score", "HeunDiscreteScheduler"),
    "dpmpp-2m": ("score", "DPMSolverMultistepScheduler"),
    "dpmpp-2m-karras": ("score", "DPMSolverMultistepScheduler"),
    "dpmpp-2m-sde": ("score", "DPMSolverMultistepScheduler"),
    "unipc": ("score", "UniPCMultistepScheduler"),
    "deis": ("score", "DEISMultistepScheduler"),
}


def test_every_named_scheduler_has_a_contract_row():
    # the flow schedulers' rows run on a flow model: test_flow_families.py
    assert set(ROWS) == set(SCHEDULERS) - set(FLOW_SCHEDULER_NAMES) and FLOW_SCHEDULER_NAMES


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def classifier():
    return tiny_models(num_classes=NUM_CLASSES).classifier


def _config(name, **kw):
    return SamplerConfig(**{**dict(scheduler=name, num_inference_steps=STEPS, guidance_scale=3.0,
                                   feedback_scale=0.1, feedback_every=2, embedding_dropout=0.0), **kw})


@pytest.mark.parametrize("name", list(ROWS))
def test_scheduler_contract(name, sd, classifier, tiny):
    mode, cls_name = ROWS[name]
    # 1. feedback off: the pipeline's own images for the same per-sample generators
    pipe_sched = sd.scheduler
    sd.scheduler = resolve_scheduler(pipe_sched, name)
    try:
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        want = sd(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, generator=gens,
                  output_type="pt").images
        plain = FeedbackGuidedSampler.from_pipe(sd, classifier=classifier,
                                                config=_config(None, feedback_scale=0))
        assert type(plain.scheduler).__name__ == cls_name
        off = plain.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    finally:
        sd.scheduler = pipe_sched
    assert (off.images - want).abs().max() < PIPE_TOL and want.std() > 0.05

    # 2. feedback on: the per-sample reference, every sample
    cfg = _config(name)
    engine = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg)
    assert engine.feedback_mode == mode and type(engine.scheduler).__name__ == cls_name
    cond = make_cond(2)
    out = engine.sample(cond, LABELS, SEEDS)
    lat, img, _ = sample_one(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg, cond.select(0),
                             LABELS[0], SEEDS[0])
    assert rel_err(out.latents[0], lat[0]) < TOL and rel_err(out.images[0], img[0]) < TOL

    # 3. a sample in a batch is the sample alone
    alone = engine.sample(cond.select(slice(1, 2)), LABELS[1:2], SEEDS[1:2])
    assert rel_err(out.latents[1], alone.latents[0]) < TOL

    # 4. the graph stand-in replays bit-identically to eager
    graphed = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg)
    graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
    got = graphed.sample(cond, LABELS, SEEDS)
    assert torch.equal(got.latents, out.latents) and torch.equal(got.images, out.images)
    fused = name == "ddim"
    assert sorted({k[0] for k in graphed.graphs.entries}) == ["feedback", "passes"]
    # the fused update is inside the graph (a_prev a static input); any other solver's step after it
    assert all((("a_prev", None) in k) != fused for k in graphed.graphs.entries)

    # 5. feedback moved every sample well beyond the tolerance
    unguided = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                     _config(name, feedback_scale=0.0)).sample(cond, LABELS, SEEDS)
    for i in range(2):
        assert rel_err(out.latents[i], unguided.latents[i]) > 100 * TOL


@pytest.mark.parametrize("name", [n for n, (mode, _) in ROWS.items() if mode == "score"])
def test_shift_form_is_refused_where_undefined(name, tiny):
    cls_name = ROWS[name][1]
    message = (f"feedback_mode 'shift' is not defined for {cls_name}: a multistep solver's history holds "
               "outputs of the states before the shift; use feedback_mode 'score' (or 'auto')")
    with pytest.raises(ValueError, match=re.escape(message)):
        FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                              _config(name, feedback_mode="shift"))


def test_score_form_under_a_shift_scheduler_equals_reference(tiny):
    cfg = _config("euler", feedback_mode="score")
    cond = make_cond(2)
    out = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg).sample(
        cond, LABELS[:2], SEEDS[:2])
    lat, _, _ = sample_one(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg, cond.select(1),
                           LABELS[1], SEEDS[1])
    assert rel_err(out.latents[1], lat[0]) < TOL


def test_v_prediction_score_form_equals_reference_form(tiny):
    """The score form converts prediction types once: a v-prediction scheduler's guided output, split back,
    carries eps' = eps - sqrt(1 - a) g."""
    from fgds_engine.ops import StepOptions, guide, split_prediction

    g = torch.Generator().manual_seed(0)
    x, eu, ec, grad = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(4))
    a = torch.tensor(0.3)
    opts = StepOptions(guidance_scale=2.0, feedback_scale=0.1, feedback_mode="score",
                       prediction_type="v_prediction")
    out, x_same = guide(eu, ec, x, a, opts, grad)
    assert x_same is x
    cfg_out = eu + 2.0 * (ec - eu)
    _, eps = split_prediction(cfg_out, x, a, "v_prediction")
    norm = lambda t: t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    gn = grad / norm(grad) * norm(x) * 0.1
    _, eps_got = split_prediction(out, x, a, "v_prediction")
    assert torch.allclose(eps_got, eps - (1 - a).sqrt() * gn, atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(scheduler="dpm-3000"),
     "unknown scheduler 'dpm-3000'; use one of ddim, ddpm, pndm, lms, euler, euler-a, heun, dpmpp-2m, "
     "dpmpp-2m-karras, dpmpp-2m-sde, unipc, deis, flow-euler, flow-dpmpp-2m or a diffusers "
     "scheduler class name (e.g. DPMSolverMultistepScheduler)"),
    (dict(scheduler="AutoencoderKL"), "unknown scheduler 'AutoencoderKL'"),
    (dict(feedback_mode="push"), "feedback_mode must be one of ('auto', 'shift', 'score'), got 'push'"),
])
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplerConfig(**kw)


def test_unsupported_schedulers_and_eta(tiny):
    from diffusers import EDMEulerScheduler

    with pytest.raises(ValueError, match=re.escape("EDMEulerScheduler is not supported: the engine runs "
                                                   "schedulers of DDPM-trained UNets (with alphas_cumprod)")):
        FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, EDMEulerScheduler(), _config(None))
    with pytest.raises(ValueError, match=re.escape("eta is the DDIM update's stochasticity; "
                                                   "EulerAncestralDiscreteScheduler draws its own noise")):
        FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                              _config("euler-a", eta=0.5))


def test_a_class_name_works_like_its_short_name(tiny):
    a = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                              _config("UniPCMultistepScheduler"))
    b = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config("unipc"))
    cond = make_cond(2)
    assert type(a.scheduler) is type(b.scheduler)
    assert torch.equal(a.sample(cond, LABELS, SEEDS).latents, b.sample(cond, LABELS, SEEDS).latents)
    assert a.graphs_status == "eager (CUDA graphs need a CUDA device, not cpu)"


def test_ddim_with_dynamic_thresholding_runs_the_schedulers_own_step(tiny):
    """Thresholding is not fused: such a DDIM config runs DDIMScheduler.step (per-sample quantiles), still
    equal to the per-sample reference."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny.scheduler.config, thresholding=True, sample_max_value=1.0)
    cfg = _config(None)
    engine = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, sched, cfg)
    assert not engine.solver.fused and engine.feedback_mode == "shift"
    cond = make_cond(2)
    out = engine.sample(cond, LABELS, SEEDS)
    lat, _, _ = sample_one(tiny.unet, tiny.vae, tiny.classifier, sched, cfg, cond.select(1), LABELS[1],
                           SEEDS[1])
    assert rel_err(out.latents[1], lat[0]) < TOL
