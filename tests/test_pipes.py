"""The pipeline-family contract: every Stable Diffusion family a drop-in user runs, one row each (as the
scheduler contract in test_solvers.py). Each row, through ``FeedbackGuidedSampler.from_pipe``:
1. feedback off, embedding dropout 0: the engine's images equal the pipeline's own call for the same
   per-sample generators, under DDIM, under the pipeline's own scheduler and under DPM-Solver++ 2M;
2. the conditioning is the pipeline's (the embeddings its encoders give), and with feedback on the engine
   equals the per-sample reference on it;
3. with feedback on, a sample in a batch equals the sample alone, and feedback moves every sample.
Then the family-specific checks (unCLIP exemplars and dropout, SDXL's VAE in float32, v-prediction) and the
refusals."""

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, rel_err
from PIL import Image
from test_flow_families import ROWS as TRANSFORMER_ROWS

from fgds_engine.models import tiny_models, tiny_pipeline
from fgds_engine.pipes import FAMILIES
from fgds_engine.reference_loop import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig
from fgds_engine.solvers import resolve_scheduler

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog", "a bird"], [1, 4, 7], [21, 22, 23]
TOL = 1e-5  # max abs difference of [0, 1] images, fp32 on the CPU (measured: 0, bit-equal)
REL = 1e-4  # relative error, fp32 on the CPU: batched vs per-sample differ only by rounding
ROWS = {  # tiny kind -> (pipeline class, adapter family, the pipeline's own scheduler, prediction type)
    "sd": ("StableDiffusionPipeline", "SD 1.x / 2.x", "DDIMScheduler", "epsilon"),
    "sd2": ("StableDiffusionPipeline", "SD 1.x / 2.x", "DDIMScheduler", "v_prediction"),
    "unclip": ("StableUnCLIPImg2ImgPipeline", "Stable unCLIP", "DDIMScheduler", "epsilon"),
    "sdxl": ("StableDiffusionXLPipeline", "SDXL", "EulerDiscreteScheduler", "epsilon"),
}


def test_every_family_has_a_contract_row():
    # the transformer families' rows: test_flow_families.py
    assert {f.family for f in FAMILIES} == {row[1] for row in (*ROWS.values(), *TRANSFORMER_ROWS.values())}


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_pipeline(kind) for kind in ROWS}


@pytest.fixture(scope="module")
def sd(pipes):
    return pipes["sd"]


@pytest.fixture(scope="module")
def unclip(pipes):
    return pipes["unclip"]


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


def family_inputs(kind, exemplars):
    """(generate's extra arguments, the pipeline call's) for a family."""
    if kind == "unclip":
        return dict(exemplar_images=exemplars, noise_level=30), dict(image=exemplars, noise_level=30)
    return {}, {}


@pytest.mark.parametrize("scheduler", [None, "ddim", "dpmpp-2m"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_family_matches_its_pipeline(kind, scheduler, pipes, exemplars):
    pipe = pipes[kind]
    pipe_cls, family, own, prediction = ROWS[kind]
    assert type(pipe).__name__ == pipe_cls and pipe.scheduler.config.prediction_type == prediction
    own_sched = pipe.scheduler
    gen_kw, call_kw = family_inputs(kind, exemplars)
    pipe.scheduler = resolve_scheduler(own_sched, scheduler)
    try:
        want = pipe_images(pipe, **call_kw)
    finally:
        pipe.scheduler = own_sched
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier(),
                                              config=config(scheduler=scheduler))
    assert sampler.adapter.family == family
    assert type(sampler.scheduler).__name__ == (own if scheduler is None else type(
        resolve_scheduler(own_sched, scheduler)).__name__)
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **gen_kw)
    assert (out.images - want).abs().max() < TOL
    assert want.std() > 0.01


@pytest.mark.parametrize("kind", list(ROWS))
def test_family_feedback_batch_equals_alone_and_reference(kind, pipes, exemplars):
    pipe = pipes[kind]
    clf = classifier()
    cfg = config(feedback_scale=0.1, feedback_every=2)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=clf, config=cfg)
    gen_kw, _ = family_inputs(kind, exemplars)
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **gen_kw)
    assert not out.nan.any()
    # a sample in a batch is the sample alone
    alone_kw = {k: v[2:] if isinstance(v, list) else v for k, v in gen_kw.items()}
    alone = sampler.generate(PROMPTS[2:], labels=LABELS[2:], seeds=SEEDS[2:], output_type="pt", **alone_kw)
    assert rel_err(out.latents[2], alone.latents[0]) < REL
    # feedback moved every sample
    off = FeedbackGuidedSampler.from_pipe(pipe, classifier=clf, config=config()).generate(
        PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt", **gen_kw)
    for i in range(len(PROMPTS)):
        assert rel_err(out.latents[i], off.latents[i]) > 100 * REL
    # the per-sample reference on the pipeline's own conditioning (its UNet keywords included)
    if ROWS[kind][3] != "epsilon" or kind == "unclip":
        # v-prediction: the demo loop's x0 formula is for epsilon (rows 1 and 3 above cover it); unCLIP:
        # its noise augmentation draws from the sample's generator before the initial latents, the
        # reference draws them from a fresh one (image embeddings vs the reference: test_sampler.py)
        return
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        cond = sampler.adapter.encode(PROMPTS, gen_kw.get("exemplar_images"), gens, use_cfg=True,
                                      noise_level=gen_kw.get("noise_level", 0),
                                      image_size=sampler.image_size)
    lat, img, _ = sample_one(pipe.unet, pipe.vae, clf, pipe.scheduler, cfg, cond.select(1), LABELS[1],
                             SEEDS[1])
    assert rel_err(out.latents[1], lat[0]) < REL and rel_err(out.images[1], img[0]) < REL


def test_unclip_exemplar_matters(unclip, exemplars):
    sampler = FeedbackGuidedSampler.from_pipe(unclip, classifier=classifier(), config=config())
    out = sampler.generate(PROMPTS, exemplars, LABELS, SEEDS, noise_level=30, output_type="pt")
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
                              "image"),
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
    assert str(err.value) == ("object is not a pipeline family the engine runs; it runs " + SUPPORTED)


SUPPORTED = ("SD 1.x / 2.x (StableDiffusionPipeline), Stable unCLIP (StableUnCLIPImg2ImgPipeline), "
             "SDXL (StableDiffusionXLPipeline), SD3 (StableDiffusion3Pipeline), Flux (FluxPipeline), "
             "PixArt-Sigma (PixArtSigmaPipeline), Sana (SanaPipeline)")


def tiny_kandinsky():
    """A tiny random KandinskyV22Pipeline: a UNet on image embeddings and a MoVQ decoder (no text)."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type=None,
        encoder_hid_dim=16, encoder_hid_dim_type="image_proj", cross_attention_dim=16, attention_head_dim=4,
        addition_embed_type="image", norm_num_groups=8, resnet_time_scale_shift="scale_shift")
    movq = VQModel(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                   num_vq_embeddings=12, vq_embed_dim=4)
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(), movq=movq)


def test_an_unsupported_pipeline_is_refused_in_one_line():
    pipe = tiny_kandinsky()
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier())
    assert str(err.value) == ("KandinskyV22Pipeline is not a pipeline family the engine runs; it runs "
                              + SUPPORTED)


def test_sdxl_vae_runs_in_float32_under_float16(pipes):
    """SDXL's VAE overflows in float16 (its config says force_upcast): the engine decodes, and takes the
    feedback gradient through the decoder, in float32 under a float16 run, as the pipeline decodes."""
    from fgds_engine.models import vae_dtype

    pipe = tiny_pipeline("sdxl")
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert vae_dtype(pipe.vae, torch.float16, upcast=True) == torch.float32
    assert vae_dtype(pipe.vae, torch.bfloat16, upcast=True) == torch.bfloat16
    assert vae_dtype(pipe.vae, torch.float16, upcast=False) == torch.float16  # SD's pipelines ignore it
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier(), config=config(
        feedback_scale=0.1, feedback_every=2), runtime=RuntimeOptions(dtype="float16"))
    assert sampler.dtype == torch.float16 and next(pipe.vae.parameters()).dtype == torch.float32
    out = sampler.generate(PROMPTS[:2], labels=LABELS[:2], seeds=SEEDS[:2], output_type="pt")
    assert out.latents.dtype == torch.float16 and out.images.dtype == torch.float32
    assert not out.nan.any()
    # the float32 decode of the float16 run is close to the float32 run's (the tiny UNet in float16 rounds)
    ref = FeedbackGuidedSampler.from_pipe(tiny_pipeline("sdxl"), classifier=classifier(), config=config(
        feedback_scale=0.1, feedback_every=2)).generate(PROMPTS[:2], labels=LABELS[:2], seeds=SEEDS[:2],
                                                         output_type="pt")
    assert (out.images - ref.images).abs().max() < 0.02


def test_sdxl_time_ids_follow_the_image_size(pipes):
    pipe = pipes["sdxl"]
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier(), config=config())
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    cond = sampler.adapter.encode(PROMPTS, None, gens, use_cfg=True, image_size=16)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3
    assert torch.equal(cond.negative_added_cond_kwargs["time_ids"], cond.added_cond_kwargs["time_ids"])
    assert cond.prompt_embeds.shape == (3, 77, 32) and cond.added_cond_kwargs["text_embeds"].shape == (3, 16)
    # force_zeros_for_empty_prompt: the unconditional half of an empty negative prompt is zeros
    assert not cond.negative_prompt_embeds.any() and not cond.negative_added_cond_kwargs["text_embeds"].any()
    want = pipe.encode_prompt(PROMPTS, None, sampler.device, 1, True, None)
    assert torch.equal(cond.prompt_embeds, want[0]) and torch.equal(cond.added_cond_kwargs["text_embeds"],
                                                                    want[2])


def test_sdxl_feedback_chunks_x0_path_graphs_and_memory_probe(pipes):
    """SDXL's keyword arguments through every path that splits or buffers a batch: feedback micro-batches
    equal the whole batch, the x0 path runs batch = alone, the graph stand-in replays bit-identically to
    eager, and the memory probe builds SDXL's conditioning from the UNet's config."""
    from fgds_engine.graphs import EagerStandIn, StepGraphs
    from fgds_engine.memory import dummy_conditioning, measure_lines

    pipe, clf = pipes["sdxl"], classifier()

    def run(runtime=None, **kw):
        s = FeedbackGuidedSampler.from_pipe(pipe, classifier=clf, config=config(
            feedback_scale=0.1, feedback_every=2, **kw), runtime=runtime)
        return s, s.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")

    sampler, whole = run()
    _, chunked = run(RuntimeOptions(feedback_chunk=1))
    assert rel_err(chunked.latents, whole.latents) < REL
    x0_sampler, x0 = run(grad_path="x0")
    alone = x0_sampler.generate(PROMPTS[1:2], labels=LABELS[1:2], seeds=SEEDS[1:2], output_type="pt")
    assert rel_err(x0.latents[1], alone.latents[0]) < REL and rel_err(x0.latents, whole.latents) > 100 * REL
    graphed = FeedbackGuidedSampler.from_pipe(pipe, classifier=clf, config=config(
        feedback_scale=0.1, feedback_every=2))
    graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
    got = graphed.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    assert torch.equal(got.latents, whole.latents)
    keys = {name for k in graphed.graphs.entries for name, *_ in k[1:]}
    assert {"cond.added_cond_kwargs.text_embeds", "uncond.added_cond_kwargs.time_ids"} <= keys
    cond = dummy_conditioning(sampler, 2)
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 16)
    assert cond.added_cond_kwargs["time_ids"].shape == (2, 6)
    cfg_line, fb_line, _ = measure_lines(sampler, lambda b: dummy_conditioning(sampler, b))
    assert fb_line.per_sample > cfg_line.per_sample > 0


class UserProcessor:
    """A caller's own attention processor (as IP-Adapter and others install theirs): torch's attention,
    counting its calls."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.calls = AttnProcessor2_0(), 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return self.inner(attn, hidden_states, *args, **kwargs)


def _state(pipe):
    """What a caller would notice changed: processors (by identity), modes, flags, dtypes, memory format."""
    mods = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    params = [(k + n, p) for k, mod in mods.items() for n, p in mod.named_parameters()]
    return {
        "processors": {n: id(p) for n, p in pipe.unet.attn_processors.items()}
        | {"vae." + n: id(p) for n, p in pipe.vae.attn_processors.items()},
        "training": {k + n: m.training for k, mod in mods.items() for n, m in mod.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in params},
        "dtype": {n: p.dtype for n, p in params},
        "scheduler": (type(pipe.scheduler).__name__, dict(pipe.scheduler.config)),
    }


def test_the_callers_pipeline_is_left_as_found():
    """A pipeline with the user's own attention processors, a UNet block in training mode and frozen text
    encoder weights: after from_pipe + generate (feedback on, another scheduler, CADS) every processor,
    mode, flag and dtype is as before, the user's processors ran, and the pipeline's own call gives the same
    images, bit for bit."""
    pipe = tiny_pipeline("sd")
    procs = {n: UserProcessor() for n in pipe.unet.attn_processors}
    pipe.unet.set_attn_processor(dict(procs))  # diffusers empties the dict it is given
    pipe.unet.up_blocks[0].train()
    pipe.text_encoder.requires_grad_(False)
    before, images = _state(pipe), pipe_images(pipe)
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier(), config=config(
        feedback_scale=0.05, feedback_every=2, scheduler="dpmpp-2m", cads=(0.3, 0.9)))
    calls = sum(p.calls for p in procs.values())
    out = sampler.generate(PROMPTS, labels=LABELS, seeds=SEEDS, output_type="pt")
    assert sampler.attention == "keep" and out.images.std() > 0.01
    assert sum(p.calls for p in procs.values()) > calls  # the engine ran the user's processors
    assert _state(pipe) == before
    assert torch.equal(pipe_images(pipe), images)
    # "sdpa" is an explicit request: it replaces the processors, in place, as its help says
    FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier(), config=config(),
                                    runtime=RuntimeOptions(attention="sdpa"))
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
