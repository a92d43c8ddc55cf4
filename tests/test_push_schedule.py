"""Where a push is undefined (docs/method.md): a push scheduled on a step at pure noise or a flow level above
0.99 moves to the next defined step of its window; the sampler, the reference and the count agree; a
schedule that never pushes is refused in one line."""

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, rel_err
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fgds_engine.config import moved_to_defined
from fgds_engine.models import tiny_flow_pipeline, tiny_models
from fgds_engine.reference_loop import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog"], [1, 4], [21, 22]


@pytest.mark.parametrize("scheduled,defined,stop,want", [
    ("x....x....", "-.........", None, ".x...x...."),  # step 0 moves to 1
    ("xxxx", "-...", None, ".xxx"),  # merges with the push already on step 1
    ("x...", "--..", None, "..x."),  # past two undefined steps
    ("x...", "-...", 1, "...."),  # its window ends first: lost
    ("x.x.", "---.", None, "...x"),  # two moved pushes merge into one
    ("..x.", "....", None, "..x."),  # defined: unchanged
])
def test_moved_to_defined(scheduled, defined, stop, want):
    got = moved_to_defined([c == "x" for c in scheduled], [c == "." for c in defined], stop)
    assert "".join("x" if p else "." for p in got) == want


@pytest.fixture(scope="module")
def classifier():
    return tiny_models(num_classes=NUM_CLASSES).classifier


def config(**kw):
    return SamplerConfig(**{**dict(num_inference_steps=4, guidance_scale=4.0, feedback_scale=0.1,
                                   embedding_dropout=0.0, image_size=16, classifier_size=16), **kw})


def counted(sampler):
    """The steps on which the sampler ran a feedback pass."""
    steps, run = [], sampler.feedback_pass

    def feedback_pass(*a, **kw):
        steps.append(len(steps))
        return run(*a, **kw)
    sampler.feedback_pass = feedback_pass
    return steps


def test_every_5th_of_30_flow_steps_pushes_6_times(classifier):
    """SD3's FlowMatchEuler starts at s = 1: the push scheduled on step 0 moves to step 1, so 6 of the 6
    scheduled pushes happen, and the sampler's count is the number of feedback passes it runs."""
    pipe = tiny_flow_pipeline("sd3")
    cfg = config(num_inference_steps=30, feedback_every=5)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    assert sampler.push_defined[0] is False and all(sampler.push_defined[1:])
    assert sampler.feedback_steps() == [1, 5, 10, 15, 20, 25] == cfg.feedback_steps(sampler.push_defined)
    passes = counted(sampler)
    sampler.generate(PROMPTS[:1], labels=LABELS[:1], seeds=SEEDS[:1], output_type="latent")
    assert len(passes) == 6


def test_schnell_four_steps_feedback_every_5_moves_its_push_and_the_reference_agrees(classifier):
    """FLUX.1-schnell's usual 4 steps with feedback every 5: the only scheduled push (step 0, s = 1) runs on
    step 1, so feedback changes the image (before the rule it was bit-identical to feedback off), and the
    per-sample reference moves it the same way."""
    pipe = tiny_flow_pipeline("flux")
    cfg = config(feedback_every=5)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
    off = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config(feedback_scale=0.0))
    assert sampler.feedback_steps() == [1]
    got = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    unguided = off.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    assert all(rel_err(got.latents[i], unguided.latents[i]) > 1e-3 for i in range(2))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        cond = sampler.adapter.encode(PROMPTS, None, gens, use_cfg=True, image_size=16)
    c = pipe.scheduler.config
    seq = (sampler.latent_shape[-1] // 2) ** 2
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    lat, _, _ = sample_one(pipe.transformer, pipe.vae, classifier, pipe.scheduler, cfg, cond.select(0),
                           LABELS[0], SEEDS[0], timestep_kwargs={"sigmas": np.linspace(1.0, 0.25, 4),
                                                                 "mu": mu})
    assert rel_err(got.latents[0], lat[0]) < 1e-4


def test_a_schedule_that_never_pushes_is_refused_in_one_line(classifier):
    pipe = tiny_flow_pipeline("sd3")
    for cfg in (config(feedback_window=(0, 1)), config(num_inference_steps=1)):
        with pytest.raises(ValueError) as err:
            FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)
        assert str(err.value) == (
            "feedback never pushes on this schedule: its steps fall where a push is undefined (steps [0]: "
            "pure noise, or a flow level above 0.99) with no defined step after them in its window; "
            "schedule it later or run more steps")
    # feedback off: nothing to refuse
    FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config(num_inference_steps=1,
                                                                               feedback_scale=0.0))
