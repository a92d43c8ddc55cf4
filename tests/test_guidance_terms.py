"""The coverage terms, each against its formula: particle repulsion (``terms/repulsion.py``, batch-level),
interval classifier-free guidance (``cfg_interval``), condition-annealed sampling (``terms/cads.py``); the
criteria as declared objects; one-line errors; determinism where a term couples a batch."""

import json
import math

import pytest
import torch
from conftest import NUM_CLASSES, make_cond, rel_err

from fgds_engine.conditioning import Conditioning
from fgds_engine.criteria import CRITERIA, criterion_help, get_criterion
from fgds_engine.ops import StepOptions, combine_pushes, guided_ddim_step, normalise_feedback
from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig
from fgds_engine.terms import CADS, StepInputs, repulsion
from fgds_engine.terms.cads import anneal, annealed, embed_class_labels, embeddings_as_class_labels

TOL = 1e-5  # fp32 on the CPU


# ---------------------------------------------------------------- particle repulsion


def _direct_kernel(z, labels):
    """The formula, written out with Python loops and the statistics module's median."""
    import statistics

    b = len(z)
    zf = z.double().reshape(b, -1)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j and labels[i] == labels[j]]
    d2 = {(i, j): float((zf[i] - zf[j]).pow(2).sum()) for i, j in pairs}
    values = sorted(d2.values())
    med = values[(len(values) - 1) // 2]  # the lower median (each pair appears twice)
    m = max(sum(1 for j in range(b) if labels[j] == labels[i]) for i in range(b))
    h = med / math.log(m + 1)
    k = torch.zeros(b, b, dtype=torch.float64)
    for (i, j), v in d2.items():
        k[i, j] = math.exp(-v / h)
    assert statistics.median_low(values) == med
    return k, h


def test_repulsion_kernel_direction_and_potential_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, 4, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 0, 1, 2, 1])  # class 2 has no partner
    k_want, h_want = _direct_kernel(z, labels)
    d2, same = repulsion._pairs(z, labels)
    assert abs(repulsion.bandwidth(d2, same).item() - h_want) / h_want < TOL
    assert torch.allclose(repulsion.kernel(z, labels).double(), k_want, rtol=1e-5, atol=1e-7)
    # the direction sum_j k_ij (z_i - z_j) is the gradient of sum_i potential_i times h / 4 (h held fixed)
    zg = z.clone().requires_grad_()
    grad = torch.autograd.grad(repulsion.potential(zg, labels).sum(), zg)[0]
    direction = repulsion.direction(z, labels)
    assert rel_err(direction, grad * h_want / 4) < 1e-4
    assert direction[5].abs().max() == 0  # no same-label partner: no push
    want0 = sum(k_want[0, j] * (z[0].double() - z[j].double()) for j in range(7))
    assert rel_err(direction[0], want0) < 1e-5


def test_combined_pushes_are_the_sum_of_the_normalised_terms():
    g = torch.Generator().manual_seed(1)
    x, grad, r = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    d, scale = combine_pushes([(grad, 0.03), (r, 0.05)])
    got = normalise_feedback(d, x, scale)
    norm = lambda t: t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    want = (grad / norm(grad) * 0.03 + r / norm(r) * 0.05) * norm(x)
    assert rel_err(got, want) < 1e-5
    only, s = combine_pushes([(r, 0.05)])
    assert only is r and s == 0.05


def _engine(tiny, runtime=None, **kw):
    cfg = SamplerConfig(**{**dict(num_inference_steps=6, guidance_scale=3.0, feedback_scale=0.0,
                                  feedback_every=2, embedding_dropout=0.0, scheduler="ddim"), **kw})
    return FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg, runtime=runtime)


def test_repulsion_step_equals_the_direct_formula(tiny):
    """One DDIM step with repulsion: x_t + rs ||x_t|| unit(sum_j k_ij (x_i - x_j)), then the update with the
    CFG output computed before the shift (the feedback shift form)."""
    s = _engine(tiny, repulsion_scale=0.1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, *s.latent_shape, generator=g)
    labels = torch.tensor([3, 3, 5, 3])
    cond = make_cond(4)
    uncond = cond.unconditional()
    t, a_t, a_prev = s.solver.start([], s.device).step_inputs(1)
    with s.frozen():
        inputs = StepInputs(x, t, a_t, a_prev, cond, uncond, labels, None, s._scales)
        got = s.step((s.terms.get("repulsion"),), inputs).x_next  # the fused DDIM update
        eps_u, eps_c = s.cfg_pass(x, t, cond, uncond)
    r = repulsion.direction(x, labels)
    norm = lambda v: v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    shifted = x + 0.1 * norm(x) * r / (norm(r) + 1e-8)
    want, _ = guided_ddim_step(eps_u, eps_c, shifted, a_t, a_prev, StepOptions(guidance_scale=3.0))
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got[2], guided_ddim_step(eps_u, eps_c, x, a_t, a_prev,
                                                StepOptions(guidance_scale=3.0))[0][2])  # no partner


def test_repulsion_couples_a_batch_deterministically(tiny):
    cond, labels, seeds = make_cond(4), [3, 3, 3, 7], [1, 2, 3, 4]
    s = _engine(tiny, repulsion_scale=0.1)
    a, b = s.sample(cond, labels, seeds), s.sample(cond, labels, seeds)
    assert torch.equal(a.latents, b.latents)  # bit-identical reruns
    off = _engine(tiny).sample(cond, labels, seeds)
    alone = s.sample(cond.select([0]), labels[:1], seeds[:1])
    # batch-level by design: a sample with partners moves and depends on them; one without does not move
    assert rel_err(a.latents[0], off.latents[0]) > 1e-2 and rel_err(a.latents[0], alone.latents[0]) > 1e-2
    assert rel_err(a.latents[3], off.latents[3]) < TOL
    # under a multistep scheduler too (score form), with feedback on
    both = _engine(tiny, scheduler="dpmpp-2m", repulsion_scale=0.1, feedback_scale=0.03)
    fb = _engine(tiny, scheduler="dpmpp-2m", feedback_scale=0.03)
    assert both.feedback_mode == "score"
    moved = rel_err(both.sample(cond, labels, seeds).latents[0], fb.sample(cond, labels, seeds).latents[0])
    assert moved > 1e-3


def test_repulsion_criterion_is_batch_level_and_runs_whole_batches(tiny):
    crit = get_criterion("feature-repulsion")
    assert crit.needs_features and not crit.per_sample and not crit.needs_stats
    assert [c.name for c in CRITERIA.values() if c.needs_stats] == ["hardness"]
    assert criterion_help() == "loss | entropy | hardness (needs --stats) | feature-repulsion (batch-level)"
    cond, labels, seeds = make_cond(4), [3, 3, 3, 3], [1, 2, 3, 4]
    whole = _engine(tiny, criterion="feature-repulsion", feedback_scale=0.1).sample(cond, labels, seeds)
    chunked = _engine(tiny, RuntimeOptions(feedback_chunk=1), criterion="feature-repulsion",
                      feedback_scale=0.1).sample(cond, labels, seeds)
    assert torch.equal(whole.latents, chunked.latents)  # chunking ignored: the term needs the whole batch
    assert rel_err(whole.criterion, chunked.criterion) < 1e-5  # the decode ran in chunks: rounding only
    off = _engine(tiny).sample(cond, labels, seeds)
    assert rel_err(whole.latents, off.latents) > 1e-2


# ---------------------------------------------------------------- interval CFG


def _unet_batches(s, cond, labels, seeds):
    sizes = []
    hook = s.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        out = s.sample(cond, labels, seeds)
    finally:
        hook.remove()
    return out, sizes


def test_interval_cfg_guides_only_inside_the_noise_window(tiny):
    cond, labels, seeds = make_cond(2), [1, 4], [5, 6]
    plain = _engine(tiny).sample(cond, labels, seeds)
    wide = _engine(tiny, cfg_interval=(0.0, 1e9)).sample(cond, labels, seeds)
    assert torch.equal(wide.latents, plain.latents)
    nowhere = _engine(tiny, cfg_interval=(1e8, 1e9)).sample(cond, labels, seeds)
    assert torch.equal(nowhere.latents, _engine(tiny, guidance_scale=1.0).sample(cond, labels, seeds).latents)
    s = _engine(tiny, cfg_interval=(0.5, 3.0))
    out, sizes = _unet_batches(s, cond, labels, seeds)
    acp = tiny.scheduler.alphas_cumprod.double()
    ts = s.solver.schedule.timesteps.tolist()
    sigmas = [math.sqrt((1 - acp[t]) / acp[t]) for t in ts]
    want = [4 if 0.5 < sg <= 3.0 else 2 for sg in sigmas]
    assert sizes == want and 2 in want and 4 in want  # the window cuts the schedule
    assert rel_err(out.latents, plain.latents) > 1e-3
    alone = s.sample(cond.select([1]), labels[1:], seeds[1:])  # per-sample: batch = alone
    assert rel_err(out.latents[1], alone.latents[0]) < 1e-4
    # every scheduler: the sigma of its model input (Euler: its own sigmas)
    e = _engine(tiny, scheduler="euler", cfg_interval=(0.5, 3.0))
    _, sizes = _unet_batches(e, cond, labels, seeds)
    run = e.solver.start([], e.device)
    assert sizes == [4 if 0.5 < sg <= 3.0 else 2 for sg in run.sigmas_host]


# ---------------------------------------------------------------- CADS


def test_cads_anneal_follows_the_formula():
    g = torch.Generator().manual_seed(3)
    y, n = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    raw = anneal(y, 0.36, n, 0.25, 0.0)
    assert rel_err(raw, 0.6 * y + 0.25 * 0.8 * n) < 1e-6
    mixed = anneal(y, 0.36, n, 0.25, 1.0)
    dims = (1, 2)
    want = (raw - raw.mean(dims, keepdim=True)) / raw.std(dims, keepdim=True) * y.std(dims, keepdim=True) \
        + y.mean(dims, keepdim=True)
    assert rel_err(mixed, want) < 1e-5
    assert rel_err(anneal(y, 1.0, n, 0.25, 1.0), y) < 1e-6  # gamma 1: y itself (the rescale is exact)
    cads = CADS((0.6, 0.9))
    assert [cads.gamma(t) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == [1.0, 1.0, pytest.approx(0.5), 0.0, 0.0]


def test_cads_text_embeddings_batch_equals_alone_and_the_unconditional_half_is_untouched(tiny):
    cond, labels, seeds = make_cond(3), [1, 4, 7], [5, 6, 7]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    a = annealed(cond, 0.5, gens, 0.25, 1.0)
    assert torch.equal(a.negative_prompt_embeds, cond.negative_prompt_embeds)
    assert rel_err(a.prompt_embeds, cond.prompt_embeds) > 0.1
    s = _engine(tiny, cads=(0.3, 0.7))
    out = s.sample(cond, labels, seeds)
    alone = s.sample(cond.select([2]), labels[2:], seeds[2:])
    assert rel_err(out.latents[2], alone.latents[0]) < 1e-4
    assert rel_err(out.latents, _engine(tiny).sample(cond, labels, seeds).latents) > 1e-3
    # gamma 1 at every step of the schedule (tau1 above the first step's time): exactly the plain run
    late = _engine(tiny, cads=(0.999, 1.0)).sample(cond, labels, seeds)
    assert torch.equal(late.latents, _engine(tiny).sample(cond, labels, seeds).latents)


@pytest.fixture(scope="module")
def class_unet():
    """A tiny class-conditional pixel-space UNet2DModel with a null class (the demos' kind of generator)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=NUM_CLASSES + 1)
    return unet.eval().requires_grad_(False)


def test_cads_on_integer_class_labels_through_the_unets_own_embedding(tiny_pixel, class_unet):
    labels, seeds = torch.tensor([1, 4, 7]), [5, 6, 7]
    cond = Conditioning(class_labels=labels, negative_class_labels=torch.full_like(labels, NUM_CLASSES))
    emb = embed_class_labels(class_unet, cond)
    assert torch.equal(emb.class_labels, class_unet.class_embedding(labels))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor(500)
    with embeddings_as_class_labels(class_unet):  # the embeddings in, the same output as the labels
        a = class_unet(x, t, class_labels=emb.class_labels).sample
    assert torch.equal(a, class_unet(x, t, class_labels=labels).sample)
    assert type(class_unet.class_embedding).__name__ == "Embedding"  # restored

    def engine(**kw):
        cfg = SamplerConfig(**{**dict(num_inference_steps=6, guidance_scale=1.5, feedback_scale=0.03,
                                      feedback_every=2, embedding_dropout=0.0, scheduler="ddim",
                                      classifier_mean=(0.5,) * 3, classifier_std=(0.5,) * 3), **kw})
        return FeedbackGuidedSampler(class_unet, None, tiny_pixel.classifier, tiny_pixel.scheduler, cfg)

    plain = engine().sample(cond, labels, seeds)
    assert torch.equal(engine(cads=(0.999, 1.0)).sample(cond, labels, seeds).latents, plain.latents)
    s = engine(cads=(0.6, 0.9))
    out = s.sample(cond, labels, seeds)
    alone = s.sample(cond.select([1]), labels[1:2], seeds[1:2])
    assert rel_err(out.latents[1], alone.latents[0]) < 1e-4
    assert rel_err(out.latents, plain.latents) > 1e-3


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("kw, message", [
    (dict(cfg_interval=(3.0, 1.0)), "cfg_interval must be two increasing numbers, got 3 1"),
    (dict(cads=(0.9, 0.6)), "cads must be two increasing numbers, got 0.9 0.6"),
    (dict(cads=(0.6, 1.5)), "cads must be <= 1.0, got 0.6/1.5"),
    (dict(cads_rescale=2.0), "cads_rescale must be <= 1.0, got 2.0"),
    (dict(repulsion_scale=-0.1), "repulsion_scale must be >= 0.0, got -0.1"),
    (dict(cads_noise=float("nan")), "cads_noise must be a finite number, got nan"),
])
def test_bad_values_are_one_line_errors(kw, message):
    with pytest.raises(ValueError) as err:
        SamplerConfig(**kw)
    assert str(err.value) == message


def test_flags_toml_and_resume_with_a_batch_level_term(tmp_path, capsys):
    """--repulsion-scale / --cfg-interval / --cads from flags and TOML, recorded in run.json; a resumed run
    with the batch-level repulsion regenerates byte-identical images (units are fixed batches)."""
    from test_production import drop_second_half, gen, images, planned

    out = planned(tmp_path)
    (tmp_path / "run.toml").write_text("[sampler]\ncads = [0.6, 0.9]\ncfg_interval = [0.28, 5.42]\n")
    extra = ["--config", str(tmp_path / "run.toml"), "--repulsion-scale", "0.05"]
    assert gen(out, *extra) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]["sampler"]
    assert cfg["cads"] == [0.6, 0.9] and cfg["cfg_interval"] == [0.28, 5.42]
    assert cfg["repulsion_scale"] == 0.05
    whole = images(out)
    assert drop_second_half(out) > 0
    assert gen(out, *extra) == 0
    assert images(out) == whole
    capsys.readouterr()
    from fgds_engine.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--cfg-interval" in text and "--cads " in text and "--repulsion-scale" in text


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_new_terms_through_the_graph_stand_in_equal_eager(tiny, scheduler):
    """Every term on the graphed path (static buffers: the annealed conditioning, the repulsion scale, the
    steps without the unconditional half) replays bit-identically to eager."""
    from fgds_engine.graphs import EagerStandIn, StepGraphs

    kw = dict(scheduler=scheduler, feedback_scale=0.03, repulsion_scale=0.05, cads=(0.3, 0.8),
              cfg_interval=(0.5, 3.0))
    cond, labels, seeds = make_cond(3), [2, 2, 5], [1, 2, 3]
    eager = _engine(tiny, **kw).sample(cond, labels, seeds)
    graphed = _engine(tiny, **kw)
    graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
    got = graphed.sample(cond, labels, seeds)
    assert torch.equal(got.latents, eager.latents)
    kinds = {k[0] for k in graphed.graphs.entries}
    assert {"feedback+repulsion", "passes"} <= kinds  # named by the terms that push on the step
