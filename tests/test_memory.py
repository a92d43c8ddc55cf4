"""Memory-aware batching: chunked feedback equals unchunked, the batch/chunk choice, --batch-size auto."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cond, rel_err
from test_production import STEPS, planned

from fgds_engine.cli import main
from fgds_engine.memory import (
    CPU_BATCH,
    BatchPlan,
    Line,
    LiveBytes,
    choose,
    dummy_conditioning,
    peak_bytes,
    plan_batch,
    resident,
)
from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
LABELS, SEEDS = [0, 3, 5, 9, 1], [10, 11, 12, 13, 14]


def _cfg(**kw):
    return SamplerConfig.faithful(
        **{**dict(num_inference_steps=4, feedback_every=1, feedback_scale=0.1), **kw}
    )


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("criterion", ["loss", "entropy"])
def test_chunked_feedback_equals_unchunked(tiny, chunk, criterion):
    """Micro-batches of 1, 2 (uneven: 2+2+1) and 4 samples give the whole batch's samples to rounding."""
    whole = FeedbackGuidedSampler(
        tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(criterion=criterion)
    )
    chunked = FeedbackGuidedSampler(
        tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(criterion=criterion),
        runtime=RuntimeOptions(feedback_chunk=chunk)
    )
    plain = FeedbackGuidedSampler(
        tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(feedback_scale=0.0)
    )
    a = whole.sample(make_cond(5), LABELS, SEEDS)
    b = chunked.sample(make_cond(5), LABELS, SEEDS)
    c = plain.sample(make_cond(5), LABELS, SEEDS)
    for i in range(5):
        assert rel_err(a.latents[i], c.latents[i]) > 1e-2  # feedback moves every sample: not vacuous
        assert rel_err(b.latents[i], a.latents[i]) < 1e-5  # seen: ~1e-7
    assert torch.equal(b.nan, a.nan)


def test_chunked_feedback_with_x0_path_and_no_cfg(tiny):
    for kw in (dict(grad_path="x0"), dict(guidance_scale=1.0)):
        a = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(**kw))
        b = FeedbackGuidedSampler(
            tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(**kw),
            runtime=RuntimeOptions(feedback_chunk=2)
        )
        x, y = a.sample(make_cond(5), LABELS, SEEDS), b.sample(make_cond(5), LABELS, SEEDS)
        assert max(rel_err(y.latents[i], x.latents[i]) for i in range(5)) < 1e-5


def test_feedback_chunk_must_be_positive():
    with pytest.raises(ValueError, match=re.escape("feedback_chunk must be >= 1, got 0")):
        RuntimeOptions(feedback_chunk=0)


def test_choose_budgets_both_graph_pools_and_the_final_decode_as_a_sum():
    """80 GiB free, 80% usable: 64 GiB. CFG 2 + 0.5/sample, feedback 2 + 3/sample, final 0 + 0.5/sample.
    Batch: (64 - 5.5 - 2) / 0.5 = 113, capped at 64; chunk: CFG(64) = 34 GiB leaves 30: (30 - 2) / 3.5 = 8."""
    cfg, fb, fin = Line(2 * GIB, 0.5 * GIB), Line(2 * GIB, 3 * GIB), Line(0, 0.5 * GIB)
    plan = choose(80 * GIB, cfg, fb, fin)
    assert (plan.batch, plan.chunk) == (64, 8)
    assert resident(cfg, fb, fin, 64, 8) == (34 + 26 + 4) * GIB <= 64 * GIB
    assert plan.why == ("80.0 GiB free x 80%: CFG graph 34.0 GiB at 64 + feedback graph 26.0 GiB at 8 + "
                        "final decode 4.0 GiB at 8 = 64.0 GiB")
    assert plan.lines == {"cfg": [2.0, 0.5], "feedback": [2.0, 3.0], "final": [0.0, 0.5]}
    # the batch leaves room for a chunk of 8: (64 - (2 + 8.8) - 2) / 1 = 51 -> 48; (64 - 50 - 2) / 1.1 = 10
    plan = choose(80 * GIB, Line(2 * GIB, 1 * GIB), Line(2 * GIB, 1 * GIB), Line(0, 0.1 * GIB))
    assert (plan.batch, plan.chunk) == (48, 10)
    # tight: not even a chunk of 8 fits beside one CFG sample, so chunk = batch, all three parts at once
    plan = choose(20 * GIB, Line(0, 1 * GIB), Line(0, 3 * GIB), Line(0, 1 * GIB))  # 16 usable: 16 / 5 = 3
    assert (plan.batch, plan.chunk) == (3, None)
    assert choose(10 * GIB, Line(0, 0.5 * GIB), Line(0, 0.5 * GIB), Line(0, 0)).batch == 8  # 8: not rounded
    with pytest.raises(RuntimeError, match="not even one sample fits: 1.0 GiB free, a CFG step needs 0.50"):
        choose(GIB, Line(0, 0.5 * GIB), Line(0, 2 * GIB), Line(0, 0))
def test_line_through_two_probes():
    line = Line.through(5 * GIB, 7 * GIB)
    assert (line.fixed, line.per_sample) == (3 * GIB, 2 * GIB)
    assert line.fits(13 * GIB) == 5


def test_plan_batch_on_the_cpu_is_fixed_and_said(tiny):
    s = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    said = []
    plan = plan_batch(s, lambda b: make_cond(b), log=said.append)
    assert plan == BatchPlan(CPU_BATCH, None, "fixed on cpu (no device memory to measure)")
    assert said == [
        "batch size auto: 8, feedback gradient and final decode in chunks of the whole batch (fixed on cpu "
        "(no device memory to measure))"
    ]


def test_plan_batch_on_a_device_from_two_probes():
    """The device path with the measurements injected: probes at batches 1 and 2 give the three lines."""
    probes = {1: (3 * GIB, 5 * GIB, 1 * GIB), 2: (3.5 * GIB, 8 * GIB, 1.25 * GIB)}
    fake = SimpleNamespace(device=torch.device("cuda"))
    said = []
    plan = plan_batch(
        fake, None, probe_fn=lambda s, c, b: probes[b], free_fn=lambda d: 70 * GIB, log=said.append
    )
    # 56 GiB usable; CFG 2.5 + 0.5 b, feedback 2 + 3 c, final 0.75 + 0.25 c
    # batch: (56 - 2.75 - 3.25 x 8 - 2.5) / 0.5 = 49 -> 48; chunk: (56 - 26.5 - 2.75) / 3.25 = 8
    assert (plan.batch, plan.chunk) == (48, 8)
    assert said[0].startswith("batch size auto: 48, feedback gradient and final decode in chunks of 8 "
                              "samples (70.0 GiB free x 80%: CFG graph 26.5 GiB at 48")


def _scaled_dry_run_lines(factor: float) -> tuple[Line, Line, Line]:
    """The lines the harvest's dry run measured for sd15-256 (fp32, live tensor bytes on the CPU), times
    ``factor``."""
    result = json.loads((ROOT / "benchmarks" / "results" / "bench-sd15-256-cpu.json").read_text())
    lines = result["memory_lines_gib"]
    assert result["dtype"] == "float32" and lines["measured"].startswith("peak live tensor bytes")
    return tuple(Line(lines[k][0] * GIB * factor, lines[k][1] * GIB * factor)
                 for k in ("cfg", "feedback", "final"))


def test_sd15_512_plan_on_the_lent_h200_leaves_room_for_both_pools_and_the_decode():
    """The dry run's sd15-256 lines scaled to sd15-512 in fp16 (x4 pixels, x1/2 bytes: an upper bound, the
    classifier's share at 224 px does not grow) on the lent H200's 139 GiB: everything resident at the end
    of a batch -- the CFG pool, the feedback pool and the final decode -- fits with headroom, where the plan
    before (batch from the CFG line, chunk from the feedback line alone, one decode of the whole batch) did
    not."""
    cfg, fb, fin = _scaled_dry_run_lines(4 * 0.5)
    assert 2.5 * GIB < fb.per_sample < 6 * GIB  # the estimate: ~3.7 GiB per feedback sample at 512
    free = 139 * GIB
    plan = plan_batch(SimpleNamespace(device=torch.device("cuda")), None, log=lambda s: None,
                      probe_fn=lambda s, c, b: (cfg.at(b), fb.at(b), fin.at(b)), free_fn=lambda d: free)
    assert plan.batch >= 32 and 8 <= plan.chunk < plan.batch
    assert resident(cfg, fb, fin, plan.batch, plan.chunk) <= 0.8 * free  # a fifth left for fragmentation
    old_batch = min(cfg.fits(0.8 * free), 64)
    old_chunk = fb.fits(0.8 * free)
    assert cfg.at(old_batch) + fb.at(old_chunk) + fin.at(old_batch) > free  # would not have fitted at all


def test_dummy_conditioning_has_the_unets_shapes(tiny, tiny_unclip):
    s = FeedbackGuidedSampler(
        tiny_unclip.unet, tiny_unclip.vae, tiny_unclip.classifier, tiny_unclip.scheduler, _cfg()
    )
    cond = dummy_conditioning(s, 3)
    assert cond.prompt_embeds.shape == (3, 77, tiny_unclip.unet.config.cross_attention_dim)
    assert cond.class_labels.shape == (3, tiny_unclip.unet.config.projection_class_embeddings_input_dim)
    s.sample(cond, [0, 1, 2], [0, 1, 2], output_type="latent")  # the UNet takes it


def test_generate_batch_size_auto_on_the_cpu_and_on_resume(tmp_path, capsys):
    out = planned(tmp_path)
    assert main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "auto", *STEPS]) == 0
    printed = capsys.readouterr().out
    said = "batch size auto: 8, feedback gradient and final decode in chunks of the whole batch (fixed on cpu"
    assert said in printed
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["options"]["batch_size"] == 8 and config["sampler"]["feedback_chunk"] is None
    assert main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "auto", *STEPS]) == 0
    assert (
        f"batch size auto: 8 with feedback chunk None, as recorded in {out}/run.json (resume)"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("value", ["0", "many"])
def test_generate_batch_size_must_be_a_positive_integer_or_auto(tmp_path, capsys, value):
    out = planned(tmp_path)
    assert main(["generate", str(out), "--preset", "tiny-random", "--batch-size", value, *STEPS]) == 2
    shown = int(value) if value.isdigit() else repr(value)
    assert capsys.readouterr().err.strip() == (
        f"fgds: error: batch_size must be an integer >= 1 or 'auto', got {shown}"
    )


def test_live_bytes_counts_what_ops_allocate_and_frees_what_dies():
    cpu = torch.device("cpu")
    assert peak_bytes(lambda: (torch.ones(1000) * 2).sum(), cpu) == 8000  # ones and the product, 4 KB each

    def loop():
        for _ in range(10):
            torch.ones(1000)  # freed before the next: never two at once

    assert peak_bytes(loop, cpu) == 4000
    kept = torch.ones(1000)
    with LiveBytes() as live:
        kept.add_(1)  # in place on a storage made before: already held
        view = kept[:10]  # a view: no new storage
        grown = torch.cat([kept, kept])
        assert live.live == 8000
        del grown
        assert live.live == 0
    assert live.peak == 8000 and view.shape == (10,)


def test_final_decode_in_chunks_equals_the_whole_batch(tiny):
    """The final decode + score in micro-batches of the feedback chunk (2 + 2 + 1) gives the whole batch's
    images and criterion to rounding."""
    whole = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    x = torch.randn(5, *whole.latent_shape, generator=torch.Generator().manual_seed(0))
    labels, nan = torch.tensor(LABELS), torch.zeros(5, dtype=torch.bool)
    a = whole.finish(x, labels, nan)
    b = whole.finish(x, labels, nan, chunk=2)
    assert a.images.shape == b.images.shape == (5, 3, 16, 16)
    assert (a.images - b.images).abs().max() < 1e-6 and (a.criterion - b.criterion).abs().max() < 1e-5
    chunked = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                    _cfg(), runtime=RuntimeOptions(feedback_chunk=2))
    assert torch.equal(chunked.finish(x, labels, nan).images, b.images)  # the config's chunk by default
