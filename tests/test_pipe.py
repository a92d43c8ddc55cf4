"""FeedbackGuidedSampler.from_pipe on tiny random StableDiffusionPipeline / StableUnCLIPImg2ImgPipeline: with
feedback off and no embedding dropout it reproduces the pipeline's own images for the same seeds."""

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES
from PIL import Image

from fgds_engine.models import tiny_models, tiny_pipeline
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog", "a bird"], [1, 4, 7], [21, 22, 23]
TOL = 1e-5  # max abs difference of [0, 1] images, fp32 on the CPU


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    return tiny_pipeline("unclip")


@pytest.fixture(scope="module")
def exemplars():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in PROMPTS]


def classifier():
    return tiny_models(num_classes=NUM_CLASSES).classifier


def config(**kw):
    return SamplerConfig(**{**dict(num_inference_steps=8, guidance_scale=4.0, feedback_scale=0.0,
                                   embedding_dropout=0.0), **kw})


def pipe_images(pipe, **kw):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(prompt=PROMPTS, num_inference_steps=8, guidance_scale=4.0, generator=gens, output_type="pt",
                **kw).images


def test_stable_diffusion_matches_pipeline(sd):
    sampler = FeedbackGuidedSampler.from_pipe(sd, classifier=classifier(), config=config())
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    want = pipe_images(sd)
    assert (out.images - want).abs().max() < TOL
    assert want.std() > 0.01


def test_unclip_matches_pipeline(unclip, exemplars):
    sampler = FeedbackGuidedSampler.from_pipe(unclip, classifier=classifier(), config=config())
    out = sampler.generate(PROMPTS, exemplars, LABELS, SEEDS, noise_level=30, output_type="pt")
    want = pipe_images(unclip, image=exemplars, noise_level=30)
    assert (out.images - want).abs().max() < TOL
    # the exemplar matters: another exemplar gives another image
    other = sampler.generate(PROMPTS, exemplars[::-1], LABELS, SEEDS, noise_level=30, output_type="pt")
    assert (other.images[0] - out.images[0]).abs().max() > 1e-3


def test_unclip_embedding_dropout_one_ignores_the_exemplar(unclip, exemplars):
    sampler = FeedbackGuidedSampler.from_pipe(unclip, classifier=classifier(),
                                              config=config(embedding_dropout=1.0))
    a = sampler.generate(PROMPTS, exemplars, LABELS, SEEDS, output_type="pt")
    b = sampler.generate(PROMPTS, exemplars[::-1], LABELS, SEEDS, output_type="pt")
    assert torch.equal(a.images, b.images)


def test_feedback_moves_the_samples_and_pil_output(sd):
    sampler = FeedbackGuidedSampler.from_pipe(sd, classifier=classifier(),
                                              config=config(feedback_scale=0.1, feedback_every=2))
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS)
    assert [im.size for im in out.pil] == [(16, 16)] * 3 and out.pil[0].mode == "RGB"
    assert np.array_equal(np.asarray(out.pil[1]), (out.images[1].permute(1, 2, 0).numpy() * 255).round())
    assert (out.images - pipe_images(sd)).abs().max() > 1e-2
    assert not out.nan.any()


@pytest.mark.parametrize("which,kwargs,message", [
    ("sd", dict(exemplar_images="x"), "StableDiffusionPipeline has no image encoder: pass exemplar_images="
                                      "None, or use a StableUnCLIPImg2ImgPipeline for image conditioning"),
    ("unclip", dict(), "StableUnCLIPImg2ImgPipeline conditions on an image embedding: pass one exemplar "
                       "image per prompt"),
    ("sd", dict(seeds=[1]), "batch size mismatch: 3 prompts, labels 3, seeds 1"),
    ("sd", dict(output_type="np"), "output_type must be 'pil', 'pt' or 'latent', got 'np'"),
    ("sd", dict(labels=None), "generate() needs labels (the classifier's target classes) and seeds, one per "
                              "prompt"),
])
def test_generate_errors(sd, unclip, which, kwargs, message):
    sampler = FeedbackGuidedSampler.from_pipe(sd if which == "sd" else unclip, classifier=classifier(),
                                              config=config())
    args = dict(exemplar_images=None, labels=LABELS, seeds=SEEDS) | kwargs
    with pytest.raises(ValueError) as err:
        sampler.generate(PROMPTS, **args)
    assert str(err.value) == message


def test_generate_needs_from_pipe_and_from_pipe_needs_a_pipeline(sd):
    m = tiny_models(num_classes=NUM_CLASSES)
    plain = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, config())
    with pytest.raises(ValueError) as err:
        plain.generate(PROMPTS, labels=LABELS, seeds=SEEDS)
    assert str(err.value) == ("generate() needs a sampler built with "
                              "FeedbackGuidedSampler.from_pipe(pipe, ...)")
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler.from_pipe(object(), classifier=m.classifier)
    assert str(err.value) == ("object has no unet, vae, scheduler, encode_prompt: from_pipe needs a Stable "
                              "Diffusion style pipeline (StableDiffusionPipeline or "
                              "StableUnCLIPImg2ImgPipeline)")
