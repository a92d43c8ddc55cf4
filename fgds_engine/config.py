"""The options of a feedback-guided sampling run, split by role: ``SamplerConfig`` (what it computes: the
math that determines the bytes; named configurations ``faithful()`` and ``paper()``), ``FeedbackOptions``
(its part the ``Feedback`` component takes whole) and ``RuntimeOptions`` (how it runs: precision, kernels,
graphs, memory)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, replace

from .fields import check_fields, option, parse_shard  # noqa: F401  (parse_shard: its old home)

GRAD_PATHS = ("full", "x0")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
BACKENDS = ("torch", "triton", "cuda", "auto")  # the fused step's (ops.resolve_backend)
FEEDBACK_MODE_CHOICES = ("auto", "shift", "score")  # the feedback forms (solvers.resolve_feedback_mode)
# the declared criteria (criteria.CRITERIA; a test keeps the two equal), and their --help line
CRITERION_NAMES = ("loss", "entropy", "hardness", "feature-repulsion")
CRITERION_HELP = "loss | entropy | hardness (needs --stats) | feature-repulsion (batch-level)"
# criterion names that moved: old -> new (the old one warns for one release; a run's identity hashes the old
# spelling, ``option(legacy=...)``, so folders written under it resume)
MOVED_CRITERIA = {"repulsion": "feature-repulsion"}
ATTENTIONS = ("keep", "sdpa", "xformers", "default")  # "default": the old name of "keep"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def __getattr__(name: str):
    """``DTYPES`` (dtype name -> torch.dtype) is built on first use: this module imports no torch."""
    if name == "DTYPES":
        return {n: torch_dtype(n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_dtype(name: str | None):
    """The torch dtype of a ``DTYPE_NAMES`` entry (None for None)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def on_schedule(i: int, every: int, window: tuple[int, int] | None, steps: int) -> bool:
    """Whether step i (0 = first, noisiest) is one of ``every`` / ``window``'s: start <= i < stop and
    (i - start) % every == 0 (the feedback schedule, which repulsion shares)."""
    start, stop = window or (0, steps)
    return start <= i < stop and (i - start) % every == 0


def moved_to_defined(scheduled: list[bool], defined: list[bool], stop: int | None = None) -> list[bool]:
    """The steps a scheduled push happens on (docs/method.md, "Where a push is undefined"): a push scheduled
    on a step where it is undefined (``defined[i]`` False: pure noise, a flow level s > 0.99) moves to the
    next step where it is defined, before ``stop`` (the schedule's window end; default: the last step), and
    merges with a push already scheduled there. A push with no such step is lost."""
    stop = len(scheduled) if stop is None else stop
    out, carry = [False] * len(scheduled), False
    for i, (want, ok) in enumerate(zip(scheduled, defined)):
        want = (want or carry) and i < stop
        out[i], carry = want and ok, want and not ok
    return out


@dataclass(frozen=True)
class SamplerConfig:
    """What a feedback-guided sampling run computes (docs/method.md); how it runs is ``RuntimeOptions``.
    Defaults: the paper's values.

    Args:
        num_inference_steps: sampling steps (the scheduler's ``set_timesteps``).
        scheduler: None (the scheduler the sampler is given: a pipeline's own) or the one to run, built from
            that scheduler's config: a short name (``solvers.SCHEDULERS``: ddim, dpmpp-2m, dpmpp-2m-karras,
            unipc, euler, euler-a, ...) or a diffusers class name.
        guidance_scale: classifier-free ("CLIP") guidance scale w; w <= 1 runs the conditional branch only. A
            guidance-distilled model (FLUX.1-dev) takes it as an input and makes no unconditional pass.
        true_cfg_scale: such a model's classifier-free guidance on top (the Flux pipeline's ``true_cfg_scale``
            with a negative prompt); 1 = none. Refused for any other model.
        feedback_scale: size of the feedback push, relative to ||x_t|| (0 disables feedback).
        criterion: "loss" | "entropy" | "hardness" | "feature-repulsion" (batch-level; the latent-space
            repulsion is the ``repulsion_scale`` term): ``criteria.CRITERIA``. "repulsion" is its old name.
        feedback_every: feedback on steps i with (i - start) % feedback_every == 0 ...
        feedback_window: ... and start <= i < stop, for (start, stop); None means every step.
        feedback_mode: "shift" (x_t += g, the demo code; single-step solvers only) | "score" (eps -= sqrt(1 -
            a_t) g; every solver) | "auto" (shift where it is defined, else score; ``sampler.feedback_mode``).
        grad_path: "full" (through UNet, decoder, classifier) | "x0" (UNet output held constant: no UNet
            backward; changes the samples, an approximation after MPGD).
        eta: DDIM stochasticity; its noise comes from each sample's own generator (DDIM only: other
            stochastic schedulers draw their own noise, from the same per-sample generators).
        embedding_dropout: probability of replacing a sample's image embedding by the unconditional one.
        image_size: pixel size of the generated images; None: the UNet's sample_size times the VAE factor.
        classifier_size: resize decoded images to this size before the classifier (None: no resize,
            as the demo code; a ViT with a fixed input size then needs matching images).
        classifier_mean, classifier_std: per-channel normalisation of the classifier input.
        cfg_interval: (lo, hi): classifier-free guidance only on steps whose noise level sigma_t = sqrt((1 -
            a_t) / a_t) of the model input satisfies lo < sigma_t <= hi; elsewhere the conditional pass alone
            (half the UNet work there). Kynkaanniemi et al. (NeurIPS 2024) used (0.28, 5.42]. None: every
            step.
        cads: (tau1, tau2): condition-annealed sampling (Sadat et al., ICLR 2024): at diffusion time t in
            [0, 1] (timestep / num_train_timesteps, 1 = noise) the conditional half's embeddings become
            sqrt(g) y + cads_noise sqrt(1 - g) n, g = 1 below tau1, 0 above tau2, linear between, then
            rescaled to y's per-sample mean and std and mixed by ``cads_rescale``. Text and image embeddings
            directly; integer class labels through the UNet's own class embedding. n is drawn from each
            sample's generator. None: off. The published defaults: (0.6, 0.9), 0.25, 1.0.
        cads_noise, cads_rescale: CADS's noise scale s and mixing factor psi.
        repulsion_scale: particle guidance (Corso et al., ICLR 2024) on the latents: on the feedback steps
            (``feedback_every`` / ``feedback_window``, whether or not feedback is on) the samples of a batch
            with the same target label are pushed apart along sum_j k_ij (x_i - x_j)
            (``terms/repulsion.py``: RBF kernel, median bandwidth), normalised like feedback to
            repulsion_scale * ||x_t||, in the feedback form. Batch-level: a sample depends on its batch
            (production's fixed batches keep runs deterministic). 0: off.
    """

    num_inference_steps: int = option(
        30, "sampling steps (the paper's 30; the pipelines' own: SD / SDXL 50, SD3 / Flux 28, unCLIP / "
        "PixArt-Sigma / Sana 20: docs/schedulers.md)", low=1)
    scheduler: str | None = option(
        None, "scheduler to run: ddim | dpmpp-2m | dpmpp-2m-karras | dpmpp-2m-sde | unipc | euler | "
        "euler-a | pndm | lms | heun | deis | ddpm; for flow-matching models (SD3, Flux, Sana) flow-euler | "
        "flow-dpmpp-2m; or a diffusers class name (default: the pipeline's own)")
    guidance_scale: float = option(
        3.0, "classifier-free guidance scale (<= 1: none; FLUX.1-dev: its embedded scale); the paper's 3.0; "
        "the pipelines' own: SD 7.5, unCLIP 10, SDXL 5.0, SD3 7.0, FLUX.1-dev 3.5, FLUX.1-schnell 1 (no "
        "CFG), PixArt-Sigma / Sana 4.5", low=0.0)
    true_cfg_scale: float = option(
        1.0, "a guidance-distilled model's (FLUX.1-dev) classifier-free guidance with the negative prompt, "
        "on top of guidance_scale taken as its input, as the Flux pipeline's true_cfg_scale (1: none; other "
        "models' CFG scale is guidance_scale)", low=0.0, neutral=1.0)
    feedback_scale: float = option(0.03, "feedback push relative to ||x_t|| (0: no feedback)")
    criterion: str = option("entropy", CRITERION_HELP,
                            legacy={new: old for old, new in MOVED_CRITERIA.items()})
    feedback_every: int = option(5, "feedback on every k-th step", low=1)
    feedback_window: tuple[int, int] | None = option(
        None, "feedback only on steps start..stop-1 (two integers)", low=0)
    feedback_mode: str = option(
        "auto", "shift (x_t += g, the demo code; single-step schedulers) | score (eps -= sqrt(1-a) g) | auto "
        "(shift where defined, else score)")
    grad_path: str = option(
        "full", "full (through the UNet) | x0 (UNet output held constant; an approximation)")
    eta: float = option(0.0, "DDIM stochasticity", low=0.0)
    embedding_dropout: float = option(0.5, "probability of dropping the image embedding", low=0.0, high=1.0)
    image_size: int | None = option(None, "image size in pixels (default: the UNet's)", low=1)
    classifier_size: int | None = option(None, "resize before the classifier", low=1)
    classifier_mean: tuple[float, ...] = option(IMAGENET_MEAN, "classifier input mean (3 floats)")
    classifier_std: tuple[float, ...] = option(IMAGENET_STD, "classifier input std (3 floats)")
    cfg_interval: tuple[float, float] | None = option(
        None, "classifier-free guidance only where lo < sigma_t <= hi (two floats; elsewhere the conditional "
        "pass alone; Kynkaanniemi et al. 2024 used 0.28 5.42)", low=0.0, neutral=None)
    cads: tuple[float, float] | None = option(
        None, "condition annealing (CADS) between diffusion times tau1 < tau2 in [0, 1] (two floats; the "
        "published 0.6 0.9)", low=0.0, high=1.0, neutral=None)
    cads_noise: float = option(0.25, "CADS noise scale s on the conditioning", low=0.0, inert_unless="cads")
    cads_rescale: float = option(1.0, "CADS mixing factor psi of the rescaled embedding", low=0.0, high=1.0,
                                 inert_unless="cads")
    skip_layer_guidance: tuple[int, ...] | None = option(
        None, "skip-layer guidance (SD3 / SD3.5's skip_guidance_layers): the transformer layers a further "
        "conditional pass skips (e.g. 7 8 9); the output moves away from that pass", low=0, neutral=None)
    skip_layer_guidance_scale: float = option(2.8, "skip-layer guidance scale", low=0.0,
                                              inert_unless="skip_layer_guidance")
    skip_layer_guidance_start: float = option(0.01, "skip-layer guidance from this fraction of the steps",
                                              low=0.0, high=1.0, inert_unless="skip_layer_guidance")
    skip_layer_guidance_stop: float = option(0.2, "skip-layer guidance up to this fraction of the steps",
                                             low=0.0, high=1.0, inert_unless="skip_layer_guidance")
    repulsion_scale: float = option(
        0.0, "particle repulsion of same-class latents in a batch, relative to ||x_t||, on the feedback "
        "steps (0: off; batch-level)", low=0.0, neutral=0.0)

    moved_runtime = None  # RuntimeOptions given through the old SamplerConfig(dtype=..., ...) (not a field)

    def __post_init__(self):
        check_fields(self)
        if self.criterion in MOVED_CRITERIA:
            warnings.warn(f"criterion {self.criterion!r} is now {MOVED_CRITERIA[self.criterion]!r} (the "
                          "latent-space repulsion is repulsion_scale); the old name goes in the next release",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "criterion", MOVED_CRITERIA[self.criterion])
        if self.criterion not in CRITERION_NAMES:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of "
                             f"{', '.join(CRITERION_NAMES)}")
        if self.feedback_mode not in FEEDBACK_MODE_CHOICES:
            raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODE_CHOICES}, "
                             f"got {self.feedback_mode!r}")
        if self.scheduler is not None:
            from .solvers.registry import SCHEDULERS, scheduler_class

            if self.scheduler not in SCHEDULERS:
                scheduler_class(self.scheduler)  # an unknown name fails here, in one line
        if self.grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path must be one of {GRAD_PATHS}, got {self.grad_path!r}")
        if self.feedback_window is not None and not self.feedback_window[0] < self.feedback_window[1]:
            raise ValueError(f"feedback_window must be start < stop, got {self.feedback_window}")
        if len(self.classifier_mean) != len(self.classifier_std):
            raise ValueError("classifier_mean and classifier_std must have the same length")
        for name in ("cfg_interval", "cads"):
            pair = getattr(self, name)
            if pair is not None and not pair[0] < pair[1]:
                raise ValueError(f"{name} must be two increasing numbers, got {pair[0]:g} {pair[1]:g}")
        if min(self.classifier_std) <= 0:
            raise ValueError(f"classifier_std must be > 0, got {'/'.join(map(str, self.classifier_std))}")

    @classmethod
    def faithful(cls, **overrides) -> SamplerConfig:
        """The authors' demo code: DDIM, text conditioning only, CFG 5, feedback every 5th step, shift
        form."""
        base = cls(scheduler="ddim", guidance_scale=5.0, embedding_dropout=0.0, feedback_mode="shift",
                   grad_path="full")
        return replace(base, **overrides)

    @classmethod
    def paper(cls, **overrides) -> SamplerConfig:
        """The paper's stated values: 30 DDIM steps, CFG 3, feedback 0.03, image-embedding dropout 0.5.

        The paper ran fp16; pass ``RuntimeOptions(dtype="float16")`` on a GPU. Its feedback frequency is
        not stated: the demo's every-5th-step is kept.
        """
        return replace(cls(scheduler="ddim"), **overrides)

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def use_feedback(self) -> bool:
        return self.feedback_scale != 0.0

    def is_feedback_step(self, i: int) -> bool:
        """Whether step i (0 = first, noisiest) is a scheduled feedback step (``feedback_every`` /
        ``feedback_window``). Where a schedule leaves the push undefined (pure noise, a flow level s > 0.99)
        it moves: ``feedback_steps`` gives the steps it happens on."""
        return self.use_feedback and on_schedule(i, self.feedback_every, self.feedback_window,
                                                 self.num_inference_steps)

    def feedback_steps(self, defined: list[bool] | None = None) -> list[int]:
        """The steps feedback pushes on, given where a push is defined on the run's schedule (``defined[i]``;
        ``sampler.push_defined``; None: everywhere): the scheduled steps, each undefined one moved to the
        next defined step of its window (``moved_to_defined``)."""
        n = self.num_inference_steps
        scheduled = [self.is_feedback_step(i) for i in range(n)]
        stop = self.feedback_window[1] if self.feedback_window else n
        moved = moved_to_defined(scheduled, [True] * n if defined is None else defined, stop)
        return [i for i, p in enumerate(moved) if p]

    @property
    def feedback_options(self) -> FeedbackOptions:
        """The options the ``Feedback`` component takes, whole."""
        return FeedbackOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FeedbackOptions)})


@dataclass(frozen=True)
class FeedbackOptions:
    """What the ``Feedback`` component needs of a run's options (``SamplerConfig.feedback_options``): the
    criterion, the gradient path and the classifier's input preprocessing (``SamplerConfig``'s fields of the
    same names)."""

    criterion: str = "entropy"
    grad_path: str = "full"
    classifier_size: int | None = None
    classifier_mean: tuple[float, ...] = IMAGENET_MEAN
    classifier_std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class RuntimeOptions:
    """How a sampling run runs, apart from what it computes (``SamplerConfig``): precision, memory format,
    kernels, attention processors, graphs and micro-batching. Apart from ``dtype`` (the models' precision),
    these change the samples by floating-point rounding at most.

    Args:
        dtype: "float32" | "float16" | "bfloat16" to cast the models to; None keeps their dtype.
        channels_last: put the UNet, VAE and classifier in channels-last memory format (faster convolutions
            at larger batches on CPU and GPU; rounding-level differences only).
        backend: the fused step's backend, "torch" | "triton" | "cuda" | "auto" (triton on CUDA devices,
            torch on the CPU; the sampler logs its choice and keeps it in ``sampler.backend``).
        attention: "keep" (the default: leave the models' attention processors as they are; torch 2's
            default processor already runs SDPA) | "sdpa" (replace every processor by ``AttnProcessor2_0``)
            | "xformers" (CUDA, optional extra). "sdpa" and "xformers" change the caller's models in place,
            on request; "default" is the old name of "keep". ``fgds generate`` loads its own pipeline and
            asks for "sdpa" unless told otherwise. Kept in ``sampler.attention``.
        cuda_graphs: capture the unguided and the feedback step in CUDA graphs on a CUDA device (elsewhere
            the sampler says so once and runs eagerly); ``sampler.graphs_status`` tells which.
        grad_scale: fp16 underflow guard: each sample's criterion is weighted to this magnitude before the
            backward (None: 1024 for fp16 models, off otherwise; the per-sample normalisation cancels it).
        feedback_chunk: run the feedback gradient pass (the memory-heavy one: UNet, decoder and classifier
            activations kept for the backward), and the final decode + score, in micro-batches of this many
            samples, while CFG steps run at the full batch; None: the whole batch at once. Samples equal the
            unchunked ones to rounding. A batch-level criterion runs on the whole batch regardless.
    """

    dtype: str | None = option(None, "cast the models: float32 | float16 | bfloat16")
    channels_last: bool = option(False, "channels-last memory format")
    backend: str = option("auto", "fused step backend: torch | triton | cuda | auto")
    attention: str = option(
        "keep", "keep (leave the models' attention processors) | sdpa | xformers (CUDA): sdpa and xformers "
        "replace every processor of the models in place")
    cuda_graphs: bool = option(True, "capture the steps in CUDA graphs (CUDA)")
    grad_scale: float | None = option(
        None, "fp16 underflow guard: per-sample criterion magnitude before the backward (auto)", low=0.0)
    feedback_chunk: int | None = option(
        None, "feedback gradient pass and final decode in micro-batches of this many samples (memory)", low=1)

    def __post_init__(self):
        check_fields(self)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES} or None, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'keep', 'sdpa' or 'xformers', got {self.attention!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def torch_dtype(self):
        """The models' torch dtype, or None (keep theirs)."""
        return torch_dtype(self.dtype)


def _accept_moved_runtime(init):
    """``SamplerConfig(dtype=..., cuda_graphs=..., ...)``: the runtime fields it held before the split keep
    working for one release, with a DeprecationWarning naming ``RuntimeOptions``; the sampler takes them
    from ``config.moved_runtime`` when it is given no ``runtime``."""
    names = {f.name for f in dataclasses.fields(RuntimeOptions)}

    def __init__(self, *args, **kwargs):
        moved = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        init(self, *args, **kwargs)
        if moved:
            warnings.warn(f"SamplerConfig({', '.join(f'{k}=' for k in moved)}) moved to RuntimeOptions: pass "
                          "runtime=RuntimeOptions(...) to the sampler; the old keywords go in the next "
                          "release",
                          DeprecationWarning, stacklevel=2)
            object.__setattr__(self, "moved_runtime", RuntimeOptions(**moved))

    return __init__


SamplerConfig.__init__ = _accept_moved_runtime(SamplerConfig.__init__)


CLASSIFIER_HELP = {  # shared by ModelOptions and ClassifierOptions
    "classifier": "timm:<arch> or torchvision:<arch>",
    "classifier_checkpoint": "local classifier weights (safetensors / state dict; none: random weights)",
    "classifier_kwargs": "JSON object of extra timm model arguments",
    "pretrained": "start from the library's pretrained weights (timm: the hub or its local cache)",
    "device": "cuda | cuda:N | cpu (default: cuda if available)",
}


@dataclass(frozen=True)
class ModelOptions:
    """Where the models come from: local folders, or hub ids through the libraries' own loaders.

    Args:
        preset: "tiny-random" builds a tiny random unCLIP pipeline and classifier (no weights at all).
        pipeline: a diffusers pipeline of a family the engine runs (SD 1.x / 2.x StableDiffusionPipeline,
            StableUnCLIPImg2ImgPipeline, SDXL StableDiffusionXLPipeline; ``fgds_engine.pipes``): a local
            folder or a hub id, through diffusers' own ``from_pretrained`` (its cache; HF_HUB_OFFLINE).
            Any other pipeline is refused from its model_index.json, before a weight is read.
        classifier: "timm:<arch>" or "torchvision:<arch>"; its number of classes must match the data.
        classifier_checkpoint: local weights of the classifier (safetensors or a plain torch state dict).
        classifier_kwargs: extra keyword arguments of the timm model, as a JSON object string.
        pretrained: start from the library's pretrained weights (timm through its hub cache).
        stats: GaussianClassStats file for the hardness criterion (``fgds`` never fits it implicitly).
        image_embedder: "open_clip:<arch>": embeds the exemplars in place of the pipeline's image encoder
            (an unCLIP pipeline; the embedding width must match), with image_embedder_checkpoint.
        device: "cuda", "cuda:1", "cpu"; default cuda (the local rank's GPU under torchrun) when available.
        threads: CPU threads for torch (None: torch's default; torchrun sets 1 per process).
        pipe_options: the pipeline's own call options (a JSON object; ``assemble.production_call_options``).
    """

    preset: str | None = option(None, "tiny-random: tiny random models (no weights; says so)")
    pipeline: str | None = option(None, "diffusers pipeline (SD 1.x/2.x, Stable unCLIP, SDXL): a local "
                                  "folder or a hub id (org/name)")
    classifier: str | None = option(None, CLASSIFIER_HELP["classifier"])
    classifier_checkpoint: str | None = option(None, CLASSIFIER_HELP["classifier_checkpoint"])
    classifier_kwargs: str | None = option(None, CLASSIFIER_HELP["classifier_kwargs"])
    pretrained: bool = option(False, CLASSIFIER_HELP["pretrained"])
    stats: str | None = option(None, "GaussianClassStats file (criterion hardness)")
    image_embedder: str | None = option(
        None, "open_clip:<arch>: embed exemplars instead of the pipeline's image encoder", neutral=None)
    image_embedder_checkpoint: str | None = option(
        None, "local open_clip weights, or an open_clip pretrained tag (e.g. laion2b_s32b_b79k)",
        inert_unless="image_embedder")
    device: str | None = option(None, CLASSIFIER_HELP["device"])
    threads: int | None = option(None, "torch CPU threads", low=1)
    pipe_options: str | None = option(
        None, "the pipeline's own call options as a JSON object, e.g. '{\"max_sequence_length\": 128, "
        "\"negative_prompt\": \"blurry\", \"use_resolution_binning\": true}': each taken with the "
        "pipeline's meaning or refused in one line (steps, guidance and size have their own options; "
        "resolution binning is off unless given here)", neutral=None)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ClassifierOptions:
    """The classifier of ``fgds train`` and ``fgds stats``: the same flags as in ``ModelOptions``, plus the
    input size of its data pipeline."""

    classifier: str = option(help=CLASSIFIER_HELP["classifier"])
    classifier_checkpoint: str | None = option(None, CLASSIFIER_HELP["classifier_checkpoint"])
    classifier_kwargs: str | None = option(None, CLASSIFIER_HELP["classifier_kwargs"])
    pretrained: bool = option(False, CLASSIFIER_HELP["pretrained"])
    image_size: int = option(224, "input size (resize + center crop)", low=1)
    device: str | None = option(None, CLASSIFIER_HELP["device"])

    def __post_init__(self):
        check_fields(self)
