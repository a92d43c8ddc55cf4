"""A pipeline user's own call, option for option (fgds_engine/pipes/call.py): for every family, each declared
option of the pipeline's ``__call__`` either works (``generate(**kw)`` equals ``pipe(**kw)`` with feedback
off, bit for bit) or is refused in one line naming it. The table per family:

- WORKS: the options and a value away from the pipeline's default; fp32 images compared (0 measured
  everywhere but Flux's true CFG, which the pipeline runs as two calls and the engine batches: 5.4e-7);
- BF16: the same with the whole pipeline in bfloat16, latents compared: bit-equal for every family but the
  fused DDIM step, which computes in fp32 where the pipeline's DDIMScheduler rounds every op to bf16
  (measured: SD 0.094 of latents up to 9.6, SD 2 0.039, unCLIP 0.094; in all three the engine's bf16
  latents are the closer to the fp32 ones: 0.095 against the pipeline's 0.132, 0.028 / 0.029, 0.089 / 0.097);
- REFUSED: the exact line;
- clip_skip reaches each family's ``encode_prompt`` as the pipeline passes it; SD's own pipeline fails with
  it under transformers 5 (its CLIPTextModel has no ``text_model``), so the rows check it on SDXL and SD3;
- DEFAULTS: ``generate()`` with no options equals ``pipe()`` with no options (the pipeline's defaults through
  ``pipeline_config``), or both refuse (the tiny PixArt / Sana have no resolution bins).
"""

import json
import re

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES
from PIL import Image
from test_flow_families import rows_per_call

from fgds_engine.errors import InputError
from fgds_engine.models import tiny_flow_pipeline, tiny_models, tiny_pipeline
from fgds_engine.models.denoisers import pack_2x2
from fgds_engine.pipes import pipeline_config
from fgds_engine.sampler import FeedbackGuidedSampler

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog"], [1, 4], [21, 22]
FLOW = ("sd3", "flux", "flux-dev", "pixart", "sana")
SIZE = {"sana": 32}
TOL = {"flux": 1e-6, "flux-dev": 1e-6}  # max abs of [0, 1] images; 0 elsewhere
BF16_TOL = {"sd": 0.25, "sd2": 0.25, "unclip": 0.25}  # the fused DDIM step (module docstring); 0 elsewhere
STEPS = {"num_inference_steps": 3}

WORKS = {
    "sd": [{"guidance_scale": 3.0}, {"negative_prompt": ["blurry", "dark"]}, {"num_images_per_prompt": 2},
           {"height": 24, "width": 24}, {"eta": 0.5}],  # clip_skip: the docstring
    "sd2": [{"guidance_scale": 6.0, "negative_prompt": ["blurry", "dark"]}],
    "unclip": [{"guidance_scale": 3.0}, {"noise_level": 100}, {"num_images_per_prompt": 2}],
    "sdxl": [{"guidance_scale": 3.0}, {"prompt_2": ["a photo", "a sketch"]},
             {"negative_prompt": ["x", "x"], "negative_prompt_2": ["y", "y"]},
             {"num_images_per_prompt": 2}, {"clip_skip": 1}, {"height": 24, "width": 24}],
    "sd3": [{"guidance_scale": 3.0},
            {"prompt_2": ["a photo", "a sketch"], "prompt_3": ["a painting", "a drawing"]},
            {"negative_prompt": ["x", "x"], "negative_prompt_2": ["y", "y"], "negative_prompt_3": ["z", "z"]},
            {"num_images_per_prompt": 2}, {"max_sequence_length": 16}, {"clip_skip": 1},
            {"height": 24, "width": 24},
            {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0},
            {"skip_guidance_layers": [0], "skip_layer_guidance_scale": 1.5,
             "skip_layer_guidance_start": 0.3}],
    "flux": [{"true_cfg_scale": 4.0, "negative_prompt": ["blurry", "dark"]}, {"guidance_scale": 7.0},
             {"prompt_2": ["a photo", "a sketch"]}, {"num_images_per_prompt": 2}, {"max_sequence_length": 16},
             {"height": 32, "width": 32}],
    "flux-dev": [{"guidance_scale": 5.0}, {"true_cfg_scale": 3.0, "negative_prompt": ["blurry", "dark"]},
                 {"true_cfg_scale": 3.0, "negative_prompt": ["x", "x"], "negative_prompt_2": ["y", "y"]}],
    "pixart": [{"guidance_scale": 3.0}, {"negative_prompt": ["blurry", "dark"]}, {"num_images_per_prompt": 2},
               {"max_sequence_length": 16}, {"height": 24, "width": 24}],
    "sana": [{"guidance_scale": 3.0}, {"negative_prompt": ["blurry", "dark"]}, {"num_images_per_prompt": 2},
             {"max_sequence_length": 16}, {"height": 64, "width": 64}],
}
BF16 = {kind: {"guidance_scale": 3.0} for kind in WORKS} | {
    "flux": {"true_cfg_scale": 3.0, "negative_prompt": ["x", "x"]},
    "sd3": {"guidance_scale": 3.0, "skip_guidance_layers": [0], "skip_layer_guidance_start": 0.0,
            "skip_layer_guidance_stop": 1.0}}


@pytest.fixture(scope="module")
def classifier():
    return tiny_models(num_classes=NUM_CLASSES).classifier


def load(kind):
    return tiny_flow_pipeline(kind) if kind in FLOW else tiny_pipeline(kind)


@pytest.fixture(scope="module")
def pipes():
    return {kind: load(kind) for kind in WORKS}


@pytest.fixture(scope="module")
def exemplars():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in PROMPTS]


def engine(pipe, classifier, **fields):
    cfg = pipeline_config(pipe, feedback_scale=0.0, classifier_size=16, **fields)
    return FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=cfg)


def both(kind, pipe, classifier, exemplars, kw, output_type="pt", **fields):
    """(the pipeline's output, the engine's) for one call with options ``kw`` (the size and, for the binned
    families, binning off, unless kw says)."""
    kw = {"height": SIZE.get(kind, 16), "width": SIZE.get(kind, 16), **kw}
    if kind in ("pixart", "sana"):
        kw.setdefault("use_resolution_binning", False)
    n = len(PROMPTS) * kw.get("num_images_per_prompt", 1)
    seeds = list(range(30, 30 + n))
    extra = {"image": exemplars} if kind == "unclip" else {}
    want = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type=output_type, **extra, **kw).images
    got = engine(pipe, classifier, **fields).generate(
        PROMPTS, exemplar_images=exemplars if kind == "unclip" else None, labels=LABELS, seeds=seeds,
        output_type=output_type, **kw)
    got = got.latents if output_type == "latent" else got.images
    if output_type == "latent" and kind.startswith("flux"):
        got = pack_2x2(got)  # the pipeline returns Flux's latents packed
    return want, got


def case_id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kind,kw", [(k, kw) for k, rows in WORKS.items() for kw in rows],
                         ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_each_option_equals_the_pipelines_call(kind, kw, pipes, classifier, exemplars):
    want, got = both(kind, pipes[kind], classifier, exemplars, {**STEPS, **kw})
    assert want.shape == got.shape and want.std() > 0.02
    assert (want - got).abs().max() <= TOL.get(kind, 0.0)


@pytest.mark.parametrize("kind", list(WORKS))
def test_bfloat16_latents_equal_the_pipelines(kind, classifier, exemplars):
    pipe = load(kind).to(torch.bfloat16)
    want, got = both(kind, pipe, classifier, exemplars, {**STEPS, **BF16[kind]}, output_type="latent")
    assert want.dtype == got.dtype == (torch.float32 if kind == "sana" else torch.bfloat16)
    assert (want.float() - got.float()).abs().max() <= BF16_TOL.get(kind, 0.0)


def test_sana_keeps_float32_latents_under_a_bf16_transformer(classifier):
    """Sana's pipeline draws and integrates in float32 whatever its transformer's dtype; so does the engine,
    from the pipeline or from the transformer alone."""
    pipe = load("sana").to(torch.bfloat16)
    sampler = engine(pipe, classifier, image_size=32)
    direct = FeedbackGuidedSampler(pipe.transformer, pipe.vae, classifier, pipe.scheduler, sampler.config)
    assert sampler.latent_dtype == direct.latent_dtype == torch.float32 and sampler.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", list(WORKS))
def test_no_options_equals_a_plain_pipe_call(kind, pipes, classifier, exemplars):
    """The pipeline's defaults (steps, guidance scale with its meaning, size, binning) when the caller says
    nothing: the same images, or the same refusal (the tiny PixArt / Sana transformers have a sample size
    the pipelines have no resolution bins for)."""
    pipe = pipes[kind]
    extra = {"image": exemplars} if kind == "unclip" else {}
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    sampler = engine(pipe, classifier)
    if kind in ("pixart", "sana"):
        with pytest.raises(ValueError, match="Invalid sample size"):
            pipe(prompt=PROMPTS, generator=gens, output_type="pt")
        with pytest.raises(InputError) as err:
            sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
        size = pipe.transformer.config.sample_size
        assert re.fullmatch(rf"\w+Pipeline's use_resolution_binning=True has no bins for a transformer of "
                            rf"sample_size {size} \(it has [\d, ]+\); pass use_resolution_binning=False",
                            str(err.value))
        return
    want = pipe(prompt=PROMPTS, generator=gens, output_type="pt", **extra).images
    got = sampler.generate(PROMPTS, exemplar_images=exemplars if kind == "unclip" else None, labels=LABELS,
                           seeds=SEEDS, output_type="pt").images
    assert sampler.config.num_inference_steps == sampler.adapter.call_default("num_inference_steps")
    assert want.shape == got.shape and (want - got).abs().max() <= TOL.get(kind, 0.0)


def test_schnells_plain_call_makes_no_unconditional_pass(pipes, classifier):
    """FLUX.1-schnell's pipeline runs CFG only for true_cfg_scale > 1 with a negative prompt: its plain call,
    and the engine's, make one transformer row per image per step; with true CFG the engine batches both
    halves (2 rows per image) where the pipeline makes two calls."""
    pipe = pipes["flux"]
    sampler = engine(pipe, classifier)
    assert sampler.terms.unconditional is None
    counts = {}
    for name, kw in (("plain", {}), ("true cfg", {"true_cfg_scale": 3.0, "negative_prompt": "x"})):
        rows, hook = rows_per_call(pipe)
        try:
            sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="latent", num_inference_steps=3,
                             height=16, width=16, **kw)
        finally:
            hook.remove()
        counts[name] = rows
    assert counts["plain"] == [2, 2, 2] and counts["true cfg"] == [4, 4, 4]


def test_a_direct_flux_transformer_gets_the_pipelines_sigmas(pipes, classifier):
    """A FLUX transformer given to the sampler directly (no pipeline) runs the Flux pipeline's sigmas (1 to
    1 / n with the dynamic shift), as from_pipe does."""
    pipe = pipes["flux-dev"]
    via_pipe = engine(pipe, classifier, num_inference_steps=6, image_size=16)
    direct = FeedbackGuidedSampler(pipe.transformer, pipe.vae, classifier, pipe.scheduler, via_pipe.config)
    cpu = torch.device("cpu")
    assert direct.family.family == "Flux"
    assert direct.solver.start([], cpu).sigma_host == via_pipe.solver.start([], cpu).sigma_host
    # and not the scheduler's own spacing
    from fgds_engine.solvers.flow import FlowSolver

    own = FlowSolver(pipe.scheduler, 6, image_seq_len=16).start([], cpu).sigma_host
    assert own != direct.solver.start([], cpu).sigma_host


REFUSED = [
    ("sd", {"guidance_rescale": 0.7}, "StableDiffusionPipeline's guidance_rescale=0.7 is refused: guidance "
     "rescale (Lin et al.) is not part of the engine's guidance combine"),
    ("sd", {"generator": 3},
     "StableDiffusionPipeline's generator=3 is refused: pass seeds=[...]: each image's "
     "generator is torch.Generator('cpu').manual_seed(seed), as the pipeline's generator=[...] list"),
    ("sd", {"sigmas": [1.0, 0.5]}, "StableDiffusionPipeline's sigmas=[1.0, 0.5] is refused: custom schedules "
     "are not taken: set num_inference_steps (the pipeline's own spacing)"),
    ("sd", {"timesteps": [999, 500]}, "StableDiffusionPipeline's timesteps=[999, 500] is refused: custom "
     "schedules are not taken: set num_inference_steps (the pipeline's own spacing)"),
    ("sd", {"cross_attention_kwargs": {"scale": 0.5}}, "StableDiffusionPipeline's cross_attention_kwargs="
     "{'scale': 0.5} is refused: attention-processor arguments (a LoRA scale) do not reach the engine's "
     "denoiser calls; fuse the LoRA into the weights (pipe.fuse_lora()) first"),
    ("sd", {"height": 20, "width": 20},
     "StableDiffusionPipeline needs height and width divisible by 8, got 20"),
    ("sd", {"height": 16, "width": 24}, "height=16 and width=24: the engine renders square images "
     "(height = width)"),
    ("sd", {"max_sequence_length": 16}, "max_sequence_length is not an option of StableDiffusionPipeline's "
     "call (nor of generate())"),
    ("sd", {"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer, got 0"),
    ("sdxl", {"original_size": (64, 64)}, "StableDiffusionXLPipeline's original_size=(64, 64) is refused: "
     "SDXL's size conditioning is the image size (original = target, crop (0, 0))"),
    ("sdxl", {"denoising_end": 0.8},
     "StableDiffusionXLPipeline's denoising_end=0.8 is refused: the engine runs "
     "the whole schedule (no base + refiner split)"),
    ("sd3", {"height": 21, "width": 21},
     "StableDiffusion3Pipeline needs height and width divisible by 2, got 21"),
    ("sd3", {"mu": 0.7},
     "StableDiffusion3Pipeline's mu=0.7 is refused: the schedule's shift is the pipeline's "
     "own, from the image's sequence length"),
    ("flux", {"true_cfg_scale": 4.0},
     "FluxPipeline's true_cfg_scale=4.0 needs a negative_prompt (without one "
     "the pipeline runs no classifier-free guidance)"),
    ("flux", {"height": 18, "width": 18}, "FluxPipeline needs height and width divisible by 4, got 18"),
    ("flux", {"sigmas": [1.0, 0.5]}, "FluxPipeline's sigmas=[1.0, 0.5] is refused: custom schedules are not "
     "taken: set num_inference_steps (the pipeline's own spacing)"),
    ("flux", {"eta": 0.5}, "eta is not an option of FluxPipeline's call (nor of generate())"),
    ("pixart", {"clean_caption": False}, "PixArtSigmaPipeline's clean_caption=False is refused: captions are "
     "preprocessed as the pipeline's default does"),
    ("pixart", {"prompt_embeds": torch.zeros(1)}, "PixArtSigmaPipeline's prompt_embeds=tensor([0.]) is "
     "refused: the engine encodes prompts with the pipeline's own encoders; precomputed embeddings go "
     "through sampler.sample(Conditioning(...))"),
    ("sana", {"height": 48, "width": 48}, "SanaPipeline needs height and width divisible by 32, got 48"),
    ("sana", {"callback_on_step_end": print},
     "SanaPipeline's callback_on_step_end=<built-in function print> is "
     "refused: the engine's loop takes no per-step callbacks (a CUDA graph replays each step); progress=True "
     "shows a progress bar"),
    ("sana", {"complex_human_instruction": ["x"]},
     "SanaPipeline's complex_human_instruction=['x'] is refused: "
     "the prompt's instruction prefix is the pipeline's default"),
]


@pytest.mark.parametrize("kind,kw,line", REFUSED, ids=[f"{k}-{next(iter(kw))}" for k, kw, _ in REFUSED])
def test_refused_in_one_line(kind, kw, line, pipes, classifier):
    sampler = engine(pipes[kind], classifier, image_size=SIZE.get(kind, 16))
    with pytest.raises(InputError) as err:
        sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="latent", **STEPS, **kw)
    assert str(err.value) == line and isinstance(err.value, ValueError)


def test_an_option_at_the_pipelines_default_is_taken(pipes, classifier):
    """An option the engine does not take away from its default changes nothing at its default value."""
    sampler = engine(pipes["sd"], classifier)
    kw = dict(labels=LABELS, seeds=SEEDS, output_type="latent", **STEPS)
    plain = sampler.generate(PROMPTS, **kw).latents
    same = sampler.generate(PROMPTS, guidance_rescale=0.0, return_dict=True, latents=None, **kw).latents
    assert torch.equal(plain, same)


def test_resolution_binning_renders_at_the_bin_and_resizes(classifier):
    """PixArt-Sigma with a transformer of sample size 32 (the pipeline's 256 bins): a 64-pixel request renders
    at the 256-pixel bin and is resized and cropped back, as the pipeline does; off, it renders natively."""
    pipe = tiny_flow_pipeline("pixart")
    pipe.transformer.register_to_config(sample_size=32)
    kw = dict(num_inference_steps=2, height=64, width=64)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    want = pipe(prompt=PROMPTS, generator=gens, output_type="pt", **kw).images
    out = engine(pipe, classifier).generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **kw)
    assert out.images.shape == want.shape == (2, 3, 64, 64) and out.latents.shape[-1] == 128
    assert (out.images - want).abs().max() == 0


# ---------------------------------------------------------------- the same options through fgds generate

BAD_PIPE_OPTIONS = [
    ('{"negative_prompt": ', "--pipe-options is not JSON: Expecting value (line 1 column 21)"),
    ('["clip_skip"]',
     '--pipe-options must be a JSON object of the pipeline\'s call options, got ["clip_skip"]'),
    ('{"num_inference_steps": 4}', "--pipe-options num_inference_steps: fgds generate sets it with "
     "--num-inference-steps"),
    ('{"height": 32}', "--pipe-options height: fgds generate sets it with --image-size"),
    ('{"guidance_rescale": 0.7}', "guidance_rescale is not an option of StableUnCLIPImg2ImgPipeline's call "
     "(nor of generate())"),
    ('{"latents": 1}', "StableUnCLIPImg2ImgPipeline's latents=1 is refused: the engine draws each sample's "
     "initial noise from its seed; pass seeds, not latents"),
]


@pytest.mark.parametrize("text,message", BAD_PIPE_OPTIONS)
def test_fgds_generate_refuses_a_bad_pipe_option_in_one_line_before_sampling(tmp_path, capsys, text,
                                                                             message):
    from test_production import planned

    from fgds_engine.cli import main

    out = planned(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    assert main(["generate", str(out), "--preset", "tiny-random", "--pipe-options", text]) == 2
    assert capsys.readouterr().err == f"fgds: error: {message}\n"
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_fgds_generate_takes_pipe_options_into_the_images_and_the_run_identity(tmp_path):
    """A negative prompt through --pipe-options changes the images and the run's identity; the same command
    resumes; true_cfg_scale on a model without a guidance embedding is refused in one line."""
    from test_production import gen, images, planned

    plain, negative = planned(tmp_path, "plain"), planned(tmp_path, "negative")
    assert gen(plain) == 0
    flags = ["--pipe-options", '{"negative_prompt": "blurry"}']
    assert gen(negative, *flags) == 0
    a, b = images(plain), images(negative)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)
    runs = [json.loads((o / "run.json").read_text()) for o in (plain, negative)]
    assert runs[0]["identity"] != runs[1]["identity"]
    assert runs[1]["config"]["models"]["pipe_options"] == '{"negative_prompt": "blurry"}'
    assert gen(negative, *flags) == 0 and images(negative) == b  # resumes: nothing left to do


def test_fgds_generate_refuses_true_cfg_scale_without_a_guidance_embedding(tmp_path, capsys):
    from test_production import gen, planned

    assert gen(planned(tmp_path), "--true-cfg-scale", "2") == 2
    assert capsys.readouterr().err == (
        "fgds: error: true_cfg_scale is the CFG of a guidance-distilled model (FLUX.1-dev); "
        "UNet2DConditionModel has no guidance embedding: its CFG scale is guidance_scale\n")
