"""Memory-aware batching: chunked feedback equals unchunked, the batch/chunk choice, --batch-size auto."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cond, rel_err
from test_production import STEPS, planned

from fgds_engine.cli import main
from fgds_engine.memory import CPU_BATCH, BatchPlan, Line, choose, dummy_conditioning, plan_batch
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig

GIB = 2**30
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
        tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(criterion=criterion, feedback_chunk=chunk)
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
            tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg(feedback_chunk=2, **kw)
        )
        x, y = a.sample(make_cond(5), LABELS, SEEDS), b.sample(make_cond(5), LABELS, SEEDS)
        assert max(rel_err(y.latents[i], x.latents[i]) for i in range(5)) < 1e-5


def test_feedback_chunk_must_be_positive():
    with pytest.raises(ValueError, match=re.escape("feedback_chunk must be >= 1 or None, got 0")):
        SamplerConfig(feedback_chunk=0)


def test_choose_fits_both_lines_into_the_free_memory():
    """80 GiB free, 80% usable: 64 GiB. CFG 2 + 0.5/sample: 124, capped at 64; feedback 2 + 3/sample: 20."""
    plan = choose(80 * GIB, Line(2 * GIB, 0.5 * GIB), Line(2 * GIB, 3 * GIB))
    assert (plan.batch, plan.chunk) == (64, 20)
    plan = choose(80 * GIB, Line(2 * GIB, 2 * GIB), Line(2 * GIB, 2.5 * GIB))
    assert (plan.batch, plan.chunk) == (24, None)  # 31 -> 24 (a multiple of 8); 24 feedback samples fit
    assert choose(10 * GIB, Line(0, 3 * GIB), Line(0, 3 * GIB)).batch == 2  # small batches are not rounded
    with pytest.raises(RuntimeError, match="not even one sample fits: 1.0 GiB free"):
        choose(GIB, Line(0, 0.5 * GIB), Line(0, 2 * GIB))


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
        "batch size auto: 8, feedback gradient in chunks of the whole batch (fixed on cpu (no device "
        "memory to measure))"
    ]


def test_plan_batch_on_a_device_from_two_probes():
    """The device path with the measurements injected: probes at batches 1 and 2 give the two lines."""
    probes = {1: (3 * GIB, 5 * GIB), 2: (3.5 * GIB, 8 * GIB)}  # CFG 0.5 GiB/sample, feedback 3 GiB/sample
    fake = SimpleNamespace(device=torch.device("cuda"))
    said = []
    plan = plan_batch(
        fake, None, probe_fn=lambda s, c, b: probes[b], free_fn=lambda d: 70 * GIB, log=said.append
    )
    assert (plan.batch, plan.chunk) == (64, 18)  # 56 GiB usable: CFG (56-2.5)/0.5 -> cap 64; (56-2)/3 = 18
    assert said[0].startswith("batch size auto: 64, feedback gradient in chunks of 18 samples (70.0 GiB free")


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
    assert "batch size auto: 8, feedback gradient in chunks of the whole batch (fixed on cpu" in printed
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
