"""The transformer families (SD3, Flux true-CFG and guidance-distilled, PixArt-Sigma, Sana) and the flow
schedulers, one contract row each, as test_pipes.py's rows for the UNet families:
1. feedback off: the engine's images equal the pipeline's own call for the same per-sample generators;
2. feedback on: a sample in a batch equals the sample alone, and feedback moved every sample;
3. the per-sample reference (its own transformer calls and flow formulas) equals the engine;
4. the graph stand-in replays bit-identically to eager, its key holding the family's fields.
Then the flow formulas against docs/method.md, the rule at s = 1, and the refusals."""

import re

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, rel_err

from fgds_engine.graphs import EagerStandIn, StepGraphs
from fgds_engine.models import tiny_flow_pipeline, tiny_models, tiny_pipeline
from fgds_engine.ops import StepOptions, flow_alpha_bar, guide, join_prediction, split_prediction
from fgds_engine.reference_loop import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
from fgds_engine.solvers import FLOW_SCHEDULER_NAMES, resolve_scheduler
from fgds_engine.solvers.flow import dynamic_shift

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog", "a bird"], [1, 4, 7], [21, 22, 23]
STEPS = 6
TOL = 1e-5  # max abs difference of [0, 1] images, fp32 on the CPU (measured: 0; Flux's true CFG 5e-7)
REL = 1e-4  # relative error, fp32 on the CPU: batched vs per-sample differ only by rounding
# tiny kind -> (pipeline class, family, the pipeline's scheduler, the feedback form "auto" gives, the
# conditioning fields a graph's key holds)
ROWS = {
    "sd3": ("StableDiffusion3Pipeline", "SD3", "FlowMatchEulerDiscreteScheduler", "shift",
            {"cond.pooled_projections", "uncond.pooled_projections"}),
    "flux": ("FluxPipeline", "Flux", "FlowMatchEulerDiscreteScheduler", "shift",
             {"cond.pooled_projections", "uncond.pooled_projections"}),
    "flux-dev": ("FluxPipeline", "Flux", "FlowMatchEulerDiscreteScheduler", "shift",
                 {"cond.pooled_projections", "cond.guidance"}),
    "pixart": ("PixArtSigmaPipeline", "PixArt-Sigma", "DPMSolverMultistepScheduler", "score",
               {"cond.attention_mask", "uncond.attention_mask"}),
    "sana": ("SanaPipeline", "Sana", "DPMSolverMultistepScheduler", "score",
             {"cond.attention_mask", "uncond.attention_mask"}),
}
SIZE = {"sana": 32}  # Sana's pipeline takes sides in multiples of 32


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_flow_pipeline(kind) for kind in ROWS}


@pytest.fixture(scope="module")
def classifier():
    return tiny_models(num_classes=NUM_CLASSES).classifier


def config(kind, **kw):
    return SamplerConfig(**{**dict(num_inference_steps=STEPS, guidance_scale=4.0, feedback_scale=0.0,
                                   embedding_dropout=0.0, image_size=SIZE.get(kind, 16), classifier_size=16),
                            **kw})


def binning(kind):
    """PixArt-Sigma's and Sana's resolution binning off, as their pipeline call here (the tiny transformers'
    sample size has no bins; ``generate`` takes the pipeline's default, on)."""
    return {"use_resolution_binning": False} if kind in ("pixart", "sana") else {}


def pipe_images(kind, pipe):
    size = SIZE.get(kind, 16)
    kw = dict(height=size, width=size)
    if kind == "flux":  # true CFG: the pipeline's scale for it, with a negative prompt
        kw.update(true_cfg_scale=4.0, negative_prompt="")
    if kind in ("pixart", "sana"):
        kw.update(use_resolution_binning=False)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, generator=gens,
                output_type="pt", **kw).images


def reference_kwargs(kind, sampler):
    """What the reference needs of a pipeline beyond the models: Flux's sigmas and mu, as its pipeline."""
    if not kind.startswith("flux"):
        return {}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    side = sampler.latent_shape[-1]
    c = sampler.scheduler.config
    mu = calculate_shift((side // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    return {"timestep_kwargs": {"sigmas": np.linspace(1.0, 1 / STEPS, STEPS), "mu": mu}}


@pytest.mark.parametrize("kind", list(ROWS))
def test_transformer_family_contract(kind, pipes, classifier):
    pipe = pipes[kind]
    pipe_cls, family, own, mode, keys = ROWS[kind]
    assert type(pipe).__name__ == pipe_cls and type(pipe.scheduler).__name__ == own
    # 1. feedback off: the pipeline's own call
    want = pipe_images(kind, pipe)
    off_sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config(kind))
    assert off_sampler.adapter.family == family
    off = off_sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **binning(kind))
    assert (off.images - want).abs().max() < TOL and want.std() > 0.05

    # 2. feedback on (steps 0, 2, 4: the first at s = 1 or 0.9997, where nothing pushes): batch = alone, every
    # sample moved, nothing non-finite. Not every step: Sana's ReLU linear attention makes the gradient
    # piecewise, and with feedback on every step a rounding-level difference crossed a kink under one torch
    # thread (batch vs alone 4.5e-4; every 2nd step: 8e-7, with one thread or two)
    cfg = config(kind, feedback_scale=0.1, feedback_every=2)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    assert sampler.feedback_mode == mode and sampler.solver.prediction_type == (
        "epsilon" if kind == "pixart" else "flow")
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **binning(kind))
    assert not out.nan.any() and torch.isfinite(out.latents).all()
    alone = sampler.generate(PROMPTS[2:], labels=LABELS[2:], seeds=SEEDS[2:], output_type="pt",
                             **binning(kind))
    assert rel_err(out.latents[2], alone.latents[0]) < REL
    for i in range(len(PROMPTS)):
        assert rel_err(out.latents[i], off.latents[i]) > 100 * REL

    # 3. the per-sample reference on the pipeline's own conditioning
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        cond = sampler.adapter.encode(PROMPTS, None, gens, use_cfg=kind != "flux-dev",
                                      image_size=sampler.image_size)
    lat, img, _ = sample_one(pipe.transformer, pipe.vae, classifier, pipe.scheduler, cfg, cond.select(1),
                             LABELS[1], SEEDS[1], **reference_kwargs(kind, sampler))
    assert rel_err(out.latents[1], lat[0]) < REL and rel_err(out.images[1], img[0]) < REL

    # 4. the graph stand-in replays bit-identically; its key holds the family's fields
    graphed = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
    got = graphed.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **binning(kind))
    assert torch.equal(got.latents, out.latents)
    names = {name for k in graphed.graphs.entries for name, *_ in k[1:]}
    assert keys <= names


def rows_per_call(pipe):
    rows = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(len(kwargs.get("hidden_states", args[0] if args else None))),
        with_kwargs=True)
    return rows, hook


def test_guidance_distilled_flux_makes_no_unconditional_pass(pipes, classifier):
    """FLUX.1-dev takes the scale through its guidance embedding: every transformer call has one row per
    sample, the feedback pass included; true CFG (the model without the embedding) doubles the CFG pass."""
    counts = {}
    for kind in ("flux-dev", "flux"):
        pipe = pipes[kind]
        sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config(
            kind, feedback_scale=0.1, feedback_every=2))
        rows, hook = rows_per_call(pipe)
        try:
            sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="latent")
        finally:
            hook.remove()
        counts[kind] = rows
    assert set(counts["flux-dev"]) == {3} and len(counts["flux-dev"]) == STEPS
    # true CFG: [uncond; cond] on the passes-only steps; the feedback steps run uncond alone + cond with grad
    assert 6 in counts["flux"] and 3 in counts["flux"]


@pytest.mark.parametrize("name", FLOW_SCHEDULER_NAMES)
def test_flow_scheduler_contract(name, pipes, classifier):
    """Each flow scheduler on the SD3 model: the pipeline's own call, batch = alone, the reference."""
    pipe = pipes["sd3"]
    own = pipe.scheduler
    pipe.scheduler = resolve_scheduler(own, name)
    try:
        want = pipe_images("sd3", pipe)
    finally:
        pipe.scheduler = own
    off = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config("sd3", scheduler=name))
    assert off.solver.prediction_type == "flow"
    got = off.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt").images
    assert (got - want).abs().max() < TOL
    cfg = config("sd3", scheduler=name, feedback_scale=0.1, feedback_every=2)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    alone = sampler.generate(PROMPTS[:1], labels=LABELS[:1], seeds=SEEDS[:1], output_type="pt")
    assert rel_err(out.latents[0], alone.latents[0]) < REL and not out.nan.any()
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        cond = sampler.adapter.encode(PROMPTS, None, gens, use_cfg=True, image_size=16)
    lat, _, _ = sample_one(pipe.transformer, pipe.vae, classifier, own, cfg, cond.select(0), LABELS[0],
                           SEEDS[0])
    assert rel_err(out.latents[0], lat[0]) < REL


# ---------------------------------------------------------------- the flow formulas (docs/method.md)

def test_flow_split_join_and_alpha_bar():
    """x_s = (1 - s) x0 + s n, v = n - x0: split recovers (x0, n) from (x_s, v) at the alpha-bar of the same
    signal-to-noise ratio, join gives v back."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for s in (0.02, 0.3, 0.75, 0.99):
        a = flow_alpha_bar(torch.tensor(s))
        assert abs(float(a) - (1 - s) ** 2 / ((1 - s) ** 2 + s**2)) < 1e-7
        x, v = (1 - s) * x0 + s * n, n - x0
        got_x0, got_n = split_prediction(v, x, a, "flow")
        assert (got_x0 - x0).abs().max() < 1e-5 and (got_n - n).abs().max() < 1e-5
        assert (join_prediction(got_x0, got_n, a, "flow") - v).abs().max() < 1e-5
    assert float(flow_alpha_bar(torch.tensor(1.0))) == 0.0


def test_flow_score_form_is_the_vp_push_on_the_score():
    """The score form moves the predicted noise by -s / c^2 g (c^2 = (1 - s)^2 + s^2; docs/method.md,
    "One push scale"), so the velocity moves by -s / ((1 - s) c^2) g and x0 by s^2 / ((1 - s) c^2) g; x_t
    stays.
    The shift form adds g to x_t and leaves the velocity."""
    gen = torch.Generator().manual_seed(1)
    x, v, grad = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    for s in (0.1, 0.5, 0.9):
        a, c2 = flow_alpha_bar(torch.tensor(s)), (1 - s) ** 2 + s**2
        opts = StepOptions(feedback_scale=0.2, feedback_mode="score", prediction_type="flow")
        out, x_same = guide(None, v, x, a, opts, grad)
        g = grad / grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * x.flatten(1).norm(dim=1).reshape(
            -1, 1, 1, 1) * 0.2
        assert torch.equal(x_same, x)
        assert (out - (v - s / ((1 - s) * c2) * g)).abs().max() < 1e-4 * (1 + s / (1 - s))
        x0, n = split_prediction(v, x, a, "flow")
        x0_new, n_new = split_prediction(out, x, a, "flow")
        assert (n_new - (n - s / c2 * g)).abs().max() < 1e-4
        assert (x0_new - (x0 + s**2 / ((1 - s) * c2) * g)).abs().max() < 1e-4
        shifted_out, shifted_x = guide(None, v, x, a, StepOptions.of(opts, feedback_mode="shift"), grad)
        assert torch.equal(shifted_out, v.float()) and (shifted_x - (x + g)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["score", "shift"])
def test_one_push_scale_flow_equals_ddpm_at_the_same_snr(mode):
    """The same sample at the same signal-to-noise ratio, as a flow state x_s = (1 - s) x0 + s n and as a
    variance-preserving one x_vp = x_s / c: the same feedback scale and gradient direction move the predicted
    clean latents (score) or the state in VP units (shift) by the same amount. Ratio flow / DDPM = 1 (to
    fp32 rounding) at every s; before the rule the score form's ratio was c^2 (0.5 at s = 0.5)."""
    gen = torch.Generator().manual_seed(3)
    x0, n, grad = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    for s in (0.2, 0.5, 0.8):
        c = ((1 - s) ** 2 + s**2) ** 0.5
        a = flow_alpha_bar(torch.tensor(s))
        x_flow, v = (1 - s) * x0 + s * n, n - x0
        x_vp = x_flow / c
        flow = StepOptions(feedback_scale=0.2, feedback_mode=mode, prediction_type="flow")
        vp = StepOptions.of(flow, prediction_type="epsilon")
        out_f, xs_f = guide(None, v, x_flow, a, flow, grad)
        out_v, xs_v = guide(None, n, x_vp, a, vp, grad)
        if mode == "score":
            moved_f = split_prediction(out_f, x_flow, a, "flow")[0] - x0
            moved_v = split_prediction(out_v, x_vp, a, "epsilon")[0] - x0
        else:
            moved_f, moved_v = (xs_f - x_flow) / c, xs_v - x_vp
        ratio = moved_f.flatten(1).norm(dim=1) / moved_v.flatten(1).norm(dim=1)
        assert torch.allclose(ratio, torch.ones(2), atol=1e-4), (s, ratio)
        assert (moved_f - moved_v).abs().max() < 1e-4 * moved_v.abs().max()


@pytest.mark.parametrize("name,mode", [("flow-euler", "score"), ("flow-euler", "shift"),
                                       ("flow-dpmpp-2m", "score")])
def test_no_push_above_s_099_and_never_nan(name, mode, pipes, classifier):
    """Every flow schedule here starts at s = 1 (FlowMatchEuler) or 0.9997 (DPM-Solver over flow sigmas):
    with feedback on every step, those steps run without a push (the 'passes' graph), the rest push, and
    nothing becomes inf / NaN in either form."""
    pipe = pipes["sd3"]
    cfg = config("sd3", scheduler=name, feedback_scale=0.1, feedback_every=1, feedback_mode=mode)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    kinds = []
    sampler._run_step = lambda pushing, s, adjusting=(): (
        kinds.append("+".join(t.name for t in pushing) or "passes"),
        FeedbackGuidedSampler._run_step(sampler, pushing, s, adjusting))[1]
    out = sampler.generate(PROMPTS[:2], labels=LABELS[:2], seeds=SEEDS[:2], output_type="pt")
    sigmas = sampler.solver.start([], torch.device("cpu")).sigma_host
    assert sigmas[0] > 0.99 and all(s <= 0.99 for s in sigmas[1:])
    assert kinds == ["passes"] + ["feedback"] * (STEPS - 1)
    assert not out.nan.any() and torch.isfinite(out.images).all()


def test_dynamic_shift_is_the_flux_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = tiny_flow_pipeline("flux").scheduler
    c = sched.config
    for seq in (16, 256, 1024, 4096):
        assert dynamic_shift(sched, seq) == pytest.approx(calculate_shift(
            seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift), abs=1e-12)


def test_a_scheduler_of_the_other_kind_is_refused_in_one_line(pipes, classifier):
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler.from_pipe(pipes["sd3"], classifier=classifier, config=config("sd3",
                                                                                           scheduler="ddim"))
    assert str(err.value) == (
        "scheduler 'ddim' is a DDPM-family scheduler but the model's FlowMatchEulerDiscreteScheduler is a "
        "flow-matching one: use one of flow-euler, flow-dpmpp-2m")
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler.from_pipe(tiny_pipeline("sd"), classifier=classifier,
                                        config=config("sd", scheduler="flow-euler"))
    assert re.fullmatch(r"scheduler 'flow-euler' is a flow-matching scheduler but the model's DDIMScheduler "
                        r"is a DDPM-family one: use one of ddim, ddpm, .*, deis", str(err.value))


@pytest.mark.parametrize("kind", ["sd3", "sana"])
def test_feedback_chunks_and_the_memory_probe_see_the_family_fields(kind, pipes, classifier):
    """Feedback micro-batches of one sample equal the whole batch (SD3's pooled projections, Sana's masks
    selected per row), and the memory probe builds the family's conditioning from the denoiser's config."""
    from fgds_engine.memory import dummy_conditioning, measure_lines
    from fgds_engine.sampler import RuntimeOptions

    pipe = pipes[kind]
    cfg = config(kind, feedback_scale=0.1, feedback_every=2)
    whole = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    chunked = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg,
                                              runtime=RuntimeOptions(feedback_chunk=1))
    a = whole.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="latent", **binning(kind))
    b = chunked.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="latent", **binning(kind))
    assert rel_err(b.latents, a.latents) < REL
    cond = dummy_conditioning(whole, 2)
    length = 77 + 256 if kind == "sd3" else 300  # CLIP + T5 as SD3 joins them; Gemma's max_sequence_length
    assert cond.prompt_embeds.shape == (2, length, pipe.transformer.config.joint_attention_dim
                                        if kind == "sd3" else pipe.transformer.config.caption_channels)
    field = "pooled_projections" if kind == "sd3" else "attention_mask"
    assert getattr(cond, field) is not None and getattr(cond.unconditional(), field) is not None
    cfg_line, fb_line, _ = measure_lines(whole, lambda n: dummy_conditioning(whole, n))
    assert fb_line.per_sample > cfg_line.per_sample > 0


def test_a_flow_scheduler_never_passes_for_a_ddpm_one(pipes):
    """Sana's DPM-Solver has alphas_cumprod but predicts flow: the DDPM solver refuses it, make_solver gives
    the flow solver."""
    from fgds_engine.solvers import DiffusersSolver, FlowSolver, make_solver

    sched = pipes["sana"].scheduler
    assert hasattr(sched, "alphas_cumprod")
    with pytest.raises(ValueError) as err:
        DiffusersSolver(sched, 4)
    assert str(err.value) == ("DPMSolverMultistepScheduler integrates a flow-matching model: it runs as a "
                              "FlowSolver (make_solver)")
    assert isinstance(make_solver(sched, 4), FlowSolver)


def test_an_odd_flux_latent_side_is_one_line(pipes, classifier):
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler.from_pipe(pipes["flux-dev"], classifier=classifier,
                                        config=config("flux-dev", image_size=18))
    assert str(err.value) == ("Flux packs its latents in 2x2 patches: image_size 18 gives 9 latent cells a "
                              "side; use a multiple of 4")
