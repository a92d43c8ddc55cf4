"""The GPU fast path's CPU-testable parts: graph bookkeeping and the eager fallback, the fp16 underflow guard,
attention selection; on a GPU (marked gpu): graphed steps and the graphed feedback gradient against eager."""

import logging
import re
from dataclasses import replace

import pytest
import torch
from conftest import make_cond, rel_err

from fgds_engine.graphs import EagerStandIn, StepGraphs, graphs_unavailable
from fgds_engine.models import set_attention, tiny_models
from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig, scaled_for_backward

LABELS, SEEDS = [0, 3, 5], [10, 11, 12]


def _cfg(**kw):
    return SamplerConfig.faithful(**{**dict(num_inference_steps=6, feedback_every=2, feedback_scale=0.1,
                                            eta=0.5), **kw})


def test_cpu_says_once_that_graphs_are_off_and_results_are_identical(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="fgds_engine.sampler"):
        on = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                   _cfg(), runtime=RuntimeOptions(cuda_graphs=True))
    assert on.graphs is None and on.graphs_status == "eager (CUDA graphs need a CUDA device, not cpu)"
    assert caplog.text.count("CUDA graphs off") == 1
    off = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(),
                                runtime=RuntimeOptions(cuda_graphs=False))
    assert off.graphs_status == "eager (cuda_graphs=False)"
    a, b = on.sample(make_cond(3), LABELS, SEEDS), off.sample(make_cond(3), LABELS, SEEDS)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)


def test_graph_bookkeeping_with_a_stand_in_replays_bit_identically(tiny):
    """Static buffers, keys, copies and replays, with a stand-in graph that re-runs the captured body."""
    eager = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    graphed = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    graphs = []
    graphed.graphs = StepGraphs(graph_factory=lambda: graphs.append(EagerStandIn()) or graphs[-1])
    want = eager.sample(make_cond(3), LABELS, SEEDS)
    got = graphed.sample(make_cond(3), LABELS, SEEDS)
    assert torch.equal(got.latents, want.latents) and torch.equal(got.images, want.images)
    assert len(graphed.graphs.entries) == 2 and len(graphs) == 2  # one CFG step and one feedback step kind
    kinds = sorted(k[0] for k in graphed.graphs.entries)
    assert kinds == ["feedback", "passes"]  # named by the terms that push on the step
    assert sum(g.captures for g in graphs) == 2 and sum(g.replays for g in graphs) == 6  # one per step
    graphed.sample(make_cond(3), LABELS, SEEDS)
    assert len(graphs) == 2 and sum(g.replays for g in graphs) == 12  # same shapes: replays only
    graphed.sample(make_cond(2), LABELS[:2], SEEDS[:2])
    assert len(graphs) == 4  # another batch size: new captures
    assert graphs[0].pool is not None and all(g.pool is graphs[0].pool for g in graphs)  # one shared pool
    graphed.graphs.clear()
    assert graphed.graphs.entries == {} and graphed.graphs.pool is None
    graphed.sample(make_cond(2), LABELS[:2], SEEDS[:2])
    assert len(graphs) == 6 and graphs[4].pool is not graphs[0].pool and graphs[5].pool is graphs[4].pool


def test_step_graph_keys_and_static_copies():
    g = StepGraphs(graph_factory=EagerStandIn)
    x = torch.zeros(2, 4, 3, 3)
    calls = []

    def body(s):
        calls.append(s["x"].data_ptr())
        return s["x"] * 2 + s["a"]

    out1 = g.run("cfg", {"x": x + 1, "a": torch.ones(1)}, body)
    out2 = g.run("cfg", {"x": x + 5, "a": torch.ones(1)}, body)
    assert torch.equal(out1, torch.full_like(x, 3.0)) and torch.equal(out2, torch.full_like(x, 11.0))
    assert len(set(calls)) == 1  # every run reads the same static buffer
    out1.add_(100)  # outputs are clones: the caller may keep or change them
    assert torch.equal(g.run("cfg", {"x": x, "a": torch.ones(1)}, body), torch.ones_like(x))
    k_nchw = StepGraphs.key("cfg", {"x": x, "noise": None})
    k_nhwc = StepGraphs.key("cfg", {"x": x.contiguous(memory_format=torch.channels_last), "noise": None})
    k_half = StepGraphs.key("cfg", {"x": x.half(), "noise": None})
    assert len({k_nchw, k_nhwc, k_half}) == 3 and StepGraphs.key("cfg", {"x": x + 1, "noise": None}) == k_nchw


def test_graphs_unavailable_reasons():
    assert graphs_unavailable(torch.device("cpu")) == "CUDA graphs need a CUDA device, not cpu"


def test_fp16_underflow_guard():
    """A saturated softmax's entropy gradient underflows in an fp16 backward; the per-sample scaling keeps
    it, and its direction is the fp32 one."""
    logits32 = torch.tensor([[30.0, 0.0, 0.0, 0.0], [28.0, 2.0, 0.0, 0.0]], requires_grad=True)
    logits16 = logits32.detach().half().requires_grad_()

    def entropy(z):
        p = z.float().softmax(1)
        return -(p * p.clamp_min(1e-30).log()).sum(1)

    g32 = torch.autograd.grad(entropy(logits32).sum(), logits32)[0]
    plain = torch.autograd.grad(entropy(logits16).sum(), logits16)[0]
    scaled = torch.autograd.grad(scaled_for_backward(entropy(logits16), 1024.0), logits16)[0]
    assert plain.abs().max() == 0  # flushed to zero in fp16
    assert scaled.abs().max() > 0
    for i in range(2):
        a, b = scaled[i].double(), g32[i].double()
        assert (a @ b) / (a.norm() * b.norm()) > 0.999  # same direction (norms ~1e-12: no eps-clamped cosine)


def test_grad_scale_does_not_change_the_samples(tiny):
    base = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    scaled = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                   _cfg(), runtime=RuntimeOptions(grad_scale=1024.0))
    a, b = base.sample(make_cond(3), LABELS, SEEDS), scaled.sample(make_cond(3), LABELS, SEEDS)
    for i in range(3):
        assert rel_err(b.latents[i], a.latents[i]) < 1e-4  # rounding only (seen: 1.0e-5)


def test_attention_selection():
    m = tiny_models(seed=1)
    assert set_attention("sdpa", torch.device("cpu"), m.unet, m.vae) == "sdpa"
    assert {type(p).__name__ for p in m.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    message = "attention 'xformers' needs a CUDA device (this one is cpu); use 'sdpa'"
    with pytest.raises(ValueError, match=re.escape(message)):
        set_attention("xformers", torch.device("cpu"), m.unet)
    assert set_attention("default", torch.device("cpu"), m.unet) == "keep"  # the old name
    with pytest.raises(ValueError, match="^attention must be 'keep', 'sdpa' or 'xformers', got 'flash'$"):
        RuntimeOptions(attention="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graphed_sampler_matches_eager_on_gpu(dtype):
    """The graphed steps (feedback backward included) against the eager ones, on the device."""
    m = tiny_models(seed=0)
    for mod in (m.unet, m.vae, m.classifier):
        mod.to("cuda")
    cond = make_cond(4).to("cuda")
    labels, seeds = [0, 3, 5, 9], [1, 2, 3, 4]
    out = {}
    for graphs in (False, True):
        s = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _cfg(),
                                  runtime=RuntimeOptions(cuda_graphs=graphs, dtype=dtype))
        assert s.graphs_status == ("cuda graphs" if graphs else "eager (cuda_graphs=False)")
        out[graphs] = s.sample(cond, labels, seeds)
        out[graphs, "again"] = s.sample(cond, labels, seeds)
        # after sampling too: a capture that failed and fell back to eager must not pass as graphed
        assert s.graphs_status == ("cuda graphs" if graphs else "eager (cuda_graphs=False)")
        if graphs:
            assert len(s.graphs.entries) == 2  # the CFG and the feedback step kinds, captured once each
    tol = 1e-3 if dtype == "float32" else 2e-2  # TF32 convolutions; atomics in some backward kernels
    for i in range(4):
        assert rel_err(out[True].latents[i], out[False].latents[i]) < tol
        assert rel_err(out[True, "again"].latents[i], out[True].latents[i]) < tol  # replays agree


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_of_two_batch_sizes_share_one_pool_and_replay_in_any_order_on_gpu():
    """Four graphs (CFG and feedback at batches 4 and 2) in one shared pool, replayed interleaved: every
    result equals eager sampling (a replay that overwrote another graph's live memory would not)."""
    m = tiny_models(seed=0)
    for mod in (m.unet, m.vae, m.classifier):
        mod.to("cuda")
    rt = RuntimeOptions(dtype="float32")
    eager = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _cfg(),
                                  runtime=replace(rt, cuda_graphs=False))
    s = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _cfg(), runtime=rt)
    calls = [(4, [0, 3, 5, 9], [1, 2, 3, 4]), (2, [1, 2], [7, 8]), (4, [0, 3, 5, 9], [1, 2, 3, 4]),
             (2, [1, 2], [7, 8])]
    for n, labels, seeds in calls:
        got = s.sample(make_cond(n).to("cuda"), labels, seeds)
        want = eager.sample(make_cond(n).to("cuda"), labels, seeds)
        for i in range(n):
            assert rel_err(got.latents[i], want.latents[i]) < 1e-3
    assert s.graphs_status == "cuda graphs" and len(s.graphs.entries) == 4
    assert len({e.graph.pool for e in s.graphs.entries.values()}) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_feedback_gradient_equals_eager_on_gpu():
    m = tiny_models(seed=0)
    for mod in (m.unet, m.vae, m.classifier):
        mod.to("cuda")
    s = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _cfg(),
                              runtime=RuntimeOptions(dtype="float16"))
    x = torch.randn(4, *s.latent_shape, device="cuda", dtype=torch.float16)
    cond = make_cond(4).to("cuda", torch.float16)
    labels = torch.tensor([0, 3, 5, 9], device="cuda")
    a_t = s.solver.schedule.alphas(2)[0].to("cuda")
    t = torch.tensor(int(s.solver.schedule.timesteps[2]), device="cuda")
    eager = s.feedback_pass(x, t, a_t, cond, cond.unconditional(), labels)[2]
    graphs = StepGraphs()
    body = lambda st: s.feedback_pass(st["x"], st["t"], st["a_t"], cond, cond.unconditional(),  # noqa: E731
                                       st["labels"])[2]
    got = graphs.run("feedback", {"x": x, "t": t, "a_t": a_t, "labels": labels}, body)
    again = graphs.run("feedback", {"x": x, "t": t, "a_t": a_t, "labels": labels}, body)
    assert got.abs().max() > 0, "the graphed gradient is zero"
    for i in range(4):
        assert rel_err(got[i].float(), eager[i].float()) < 2e-2
        assert rel_err(again[i].float(), got[i].float()) < 2e-2


def test_a_failed_capture_is_reported_and_the_step_runs_eagerly(tiny, caplog):
    class Broken(EagerStandIn):
        def capture(self, body, pool=None):
            raise RuntimeError("operation not permitted when stream is capturing")

    eager = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    s = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    s.graphs = StepGraphs(graph_factory=Broken)
    with caplog.at_level(logging.WARNING, logger="fgds_engine.sampler"):
        out = s.sample(make_cond(3), LABELS, SEEDS)
    assert s.graphs is None and s.graphs_status.startswith("eager (capture failed: operation not permitted")
    assert caplog.text.count("CUDA graph capture failed") == 1
    assert torch.equal(out.latents, eager.sample(make_cond(3), LABELS, SEEDS).latents)


def test_a_step_record_comes_back_from_the_graph_as_a_record_of_clones():
    """A step's body returns a ``StepUpdate``: each replay gives one back, its tensors cloned (the next
    replay overwrites the graph's outputs), its empty fields None."""
    from fgds_engine.solvers import StepUpdate

    g = StepGraphs(graph_factory=EagerStandIn)
    x = torch.randn(2, 3)
    seen = []
    for k in range(3):
        out = g.run("passes", {"x": x + k}, lambda st: StepUpdate(x_next=st["x"] * 2))
        assert isinstance(out, StepUpdate) and out.output is None and out.x_shifted is None
        assert torch.equal(out.x_next, 2 * (x + k))
        seen.append(out.x_next)
    assert torch.equal(seen[0], 2 * x)  # not overwritten by the later replays
