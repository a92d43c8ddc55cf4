"""Build the engine a generation run needs from ``ModelOptions``: local folders or hub ids through the
libraries' own loaders (diffusers ``from_pretrained``, timm ``create_model``, open_clip's factory), or the
tiny-random preset. Every bad combination of options is one ``InputError`` line, raised before anything is
written."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import ModelOptions
from .deprecation import moved_names
from .errors import InputError
from .production import GeneratedBatch
from .sampler import FeedbackGuidedSampler, SamplerConfig

MODEL_PRESETS = ("tiny-random",)  # fgds generate --preset: model sets built in code
__getattr__ = moved_names(__name__, {"PRESETS": "fgds_engine.assemble:MODEL_PRESETS"})
RANDOM_WEIGHTS_NOTE = ("NOTE: --preset tiny-random: the UNet, VAE, encoders and classifier have RANDOM "
                       "weights; the images are noise-like patterns (for trying and testing the pipeline "
                       "only)")


def pick_device(opts: ModelOptions) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_pipeline(name: str, *, progress: bool = True):
    """A diffusers pipeline from a local folder or a hub id (its cache, HF_HUB_OFFLINE), or one clear line;
    ``progress=False`` silences diffusers' and transformers' loading bars (``--quiet``)."""
    from diffusers import DiffusionPipeline

    if not progress:
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    path = Path(name)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"pipeline folder {name} holds no diffusers pipeline (model_index.json "
                             "missing); save one with pipe.save_pretrained(folder)")
        source = str(path)
    elif HUB_ID.match(name):
        source = name
    else:
        raise InputError(f"pipeline {name!r} is neither a folder nor a hub id (org/name)")
    import diffusers.utils.logging as dlog

    from .pipes import family_of, unsupported_message

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # a failure is said once, below, not as a warning paragraph before it
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about diffusers' arguments
            warnings.simplefilter("ignore")
            class_name = DiffusionPipeline.load_config(source).get("_class_name", "?")
        if family_of(class_name) is None:  # refused before any weight is read
            raise InputError(f"pipeline {name}: {unsupported_message(class_name)}")
        return DiffusionPipeline.from_pretrained(source)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # not in the cache offline, unreachable, not a pipeline
        raise InputError(f"cannot load pipeline {name}: {_first_line(e)}") from None
    finally:
        dlog.set_verbosity(level)


def check_combinations(opts: ModelOptions, config: SamplerConfig) -> None:
    """Options that would be given but do nothing in this combination: refused, with the fix."""
    if opts.preset and opts.pipeline:
        raise InputError("give either --preset or --pipeline, not both")
    for flag, value in (("--classifier-checkpoint", opts.classifier_checkpoint),
                        ("--classifier-kwargs", opts.classifier_kwargs), ("--pretrained", opts.pretrained)):
        if value and not opts.classifier:
            extra = " (the tiny-random preset's own classifier has random weights)" if opts.preset else ""
            raise InputError(f"{flag} needs --classifier timm:<arch> or torchvision:<arch>{extra}")
    if opts.pretrained and opts.classifier_checkpoint:
        raise InputError("give either --pretrained or --classifier-checkpoint, not both")
    if opts.image_embedder_checkpoint and not opts.image_embedder:
        raise InputError("--image-embedder-checkpoint needs --image-embedder open_clip:<arch>")
    from .criteria import CRITERIA, get_criterion

    crit = get_criterion(config.criterion)
    if crit.needs_stats and not opts.stats:
        raise InputError(f"criterion {crit.name!r} needs --stats: GaussianClassStats fitted on the real "
                         "data's classifier features")
    if opts.stats and not crit.needs_stats:
        users = " or ".join(c.name for c in CRITERIA.values() if c.needs_stats)
        raise InputError(f"--stats is used by --criterion {users} only (this run's criterion is "
                         f"{config.criterion}, or feedback is off)")


def head_classes(state: dict) -> int | None:
    """Output size of a checkpoint's last 2-D weight (its classification head), if any."""
    heads = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
    return int(heads[-1].shape[0]) if heads else None


def load_classifier(opts: ModelOptions, num_classes: int) -> torch.nn.Module:
    """The classifier named by ``opts.classifier`` with its checkpoint; its class count must be the data's."""
    from .models import load_state_dict_file, load_timm_classifier, load_torchvision_classifier

    if not opts.classifier:
        raise InputError("a classifier is needed: --classifier timm:<arch> or torchvision:<arch> "
                         "(with --classifier-checkpoint)")
    lib, _, arch = opts.classifier.partition(":")
    if lib not in ("timm", "torchvision") or not arch:
        raise InputError(f"--classifier must be timm:<arch> or torchvision:<arch>, got {opts.classifier!r}")
    kwargs = json.loads(opts.classifier_kwargs) if opts.classifier_kwargs else {}
    state = None
    if opts.classifier_checkpoint:
        try:
            state = load_state_dict_file(opts.classifier_checkpoint)
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        k = head_classes(state)
        if k is not None and k != num_classes:
            raise InputError(f"the classifier checkpoint {opts.classifier_checkpoint} has {k} classes but "
                             f"the data has {num_classes}")
    load = load_timm_classifier if lib == "timm" else load_torchvision_classifier
    pretrained = getattr(opts, "pretrained", False)
    try:  # random or pretrained weights; a checked checkpoint goes in below
        model = load(arch, num_classes=num_classes, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:  # not in the cache offline, unreachable, unknown tag
        raise InputError(f"cannot load the pretrained weights of {opts.classifier}: "
                         f"{_first_line(e)}") from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"the classifier checkpoint {opts.classifier_checkpoint} does not fit {arch}: "
                             f"{str(e).splitlines()[0]}") from None
    return model


def build_sampler(opts: ModelOptions, config: SamplerConfig, num_classes: int, *, runtime=None, log=print,
                  progress: bool = True):
    """(sampler, whether jobs need exemplar images) for a run over ``num_classes`` classes."""
    from .class_stats import load_class_stats
    from .models import tiny_classifier, tiny_pipeline
    from .pipes import needs_exemplars

    check_combinations(opts, config)
    device = pick_device(opts)
    if opts.preset:
        if opts.preset not in MODEL_PRESETS:
            raise InputError(f"unknown preset {opts.preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        log(RANDOM_WEIGHTS_NOTE)
        pipe = tiny_pipeline("unclip", seed=0)
        classifier = load_classifier(opts, num_classes) if opts.classifier else tiny_classifier(num_classes)
    elif opts.pipeline:
        pipe = load_pipeline(opts.pipeline, progress=progress)
        classifier = load_classifier(opts, num_classes)
    else:
        raise InputError("no models: pass --pipeline FOLDER_OR_HUB_ID (with --classifier ...) or --preset "
                         "tiny-random")
    stats = None
    if opts.stats:
        try:
            stats = load_class_stats(opts.stats)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
    pipe.to(device)
    classifier.to(device)
    try:
        sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=config, runtime=runtime,
                                                  stats=stats)
    except ValueError as e:
        raise InputError(str(e)) from None
    sampler.image_embedder = load_image_embedder(opts, pipe, device)
    return sampler, needs_exemplars(pipe) or sampler.image_embedder is not None


def check_noise_level(sampler: FeedbackGuidedSampler, noise_level: int) -> None:
    """--noise-level does something only for an unCLIP pipeline."""
    from .pipes import takes_image_embeds

    if noise_level and not takes_image_embeds(sampler.pipe):
        raise InputError(f"--noise-level is for unCLIP pipelines; {type(sampler.pipe).__name__} takes no "
                         "image embeddings")


def load_image_embedder(opts: ModelOptions, pipe, device):
    """(open_clip model, preprocess) named by ``opts.image_embedder``, or None."""
    from .models import load_open_clip_embedder

    if not opts.image_embedder:
        return None
    lib, _, arch = opts.image_embedder.partition(":")
    if lib != "open_clip" or not arch:
        raise InputError(f"--image-embedder must be open_clip:<arch>, got {opts.image_embedder!r}")
    if not opts.image_embedder_checkpoint:
        raise InputError("--image-embedder needs --image-embedder-checkpoint (a local file or an open_clip "
                         "pretrained tag)")
    from .pipes import takes_image_embeds

    if not takes_image_embeds(pipe):
        raise InputError(f"--image-embedder needs an unCLIP pipeline; {type(pipe).__name__} takes no image "
                         "embeddings")
    try:
        model, preprocess = load_open_clip_embedder(arch, opts.image_embedder_checkpoint)
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot load open_clip {arch} ({opts.image_embedder_checkpoint}): "
                         f"{_first_line(e)}") from None
    return model.to(device), preprocess


# call options a production run sets through its own options, not --pipe-options
OWN_SETTING = {"num_inference_steps": "--num-inference-steps", "guidance_scale": "--guidance-scale",
               "true_cfg_scale": "--true-cfg-scale", "eta": "--eta", "height": "--image-size",
               "width": "--image-size", "output_type": "nothing (the run writes images)",
               "noise_level": "--noise-level", "num_images_per_prompt": "the plan (one image per job)",
               "prompt": "the plan (one prompt per job)"}


def production_call_options(sampler: FeedbackGuidedSampler, text: str | None) -> dict:
    """The pipeline call options of a production run (``--pipe-options``, a JSON object), checked before any
    sampling: each one the engine takes (``pipes.call``), or one line. Resolution binning is off unless
    given (production renders natively, as before the option existed: a run's identity predates it)."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise InputError(f"--pipe-options is not JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    if not isinstance(options, dict):
        raise InputError(f"--pipe-options must be a JSON object of the pipeline's call options, got {text}")
    if sampler.adapter is None:
        if options:
            raise InputError("--pipe-options needs a diffusers pipeline (--pipeline)")
        return {}
    for name in options:
        if name in OWN_SETTING:
            raise InputError(f"--pipe-options {name}: fgds generate sets it with {OWN_SETTING[name]}")
    from .pipes.call import call_parameters, split_options

    if "use_resolution_binning" in call_parameters(sampler.pipe):
        options = {"use_resolution_binning": False, **options}
    split_options(sampler.adapter, {k: v for k, v in options.items() if k != "negative_prompt"})
    return options


def make_sample_fn(sampler: FeedbackGuidedSampler, data_root: str | Path, needs_exemplars: bool,
                   noise_level: int, call_options: dict | None = None):
    """The production loop's view of the sampler: prompts, exemplar paths, labels, seeds -> uint8 images
    (``call_options``: the pipeline's, ``production_call_options``)."""
    from PIL import Image

    root = Path(data_root)
    embedder = getattr(sampler, "image_embedder", None)

    def sample_fn(prompts, exemplars, labels, seeds):
        images, embeds = None, None
        if needs_exemplars:
            images = []
            for e in exemplars:
                with Image.open(root / e) as im:
                    images.append(im.convert("RGB"))
        if embedder is not None:
            model, preprocess = embedder
            device = next(model.parameters()).device
            with torch.no_grad():
                embeds = model.encode_image(torch.stack([preprocess(im) for im in images]).to(device))
            images = None
        out = sampler.generate(prompts, images, labels, seeds, output_type="pt", noise_level=noise_level,
                               image_embeds=embeds, **(call_options or {}))
        arr = torch.nan_to_num(out.images.float(), nan=0.0).permute(0, 2, 3, 1).cpu().numpy()
        arr = (arr * 255).round().clip(0, 255).astype(np.uint8)
        return GeneratedBatch(arr, out.criterion.tolist(), out.nan.tolist())

    return sample_fn


def auto_batch(sampler, gen, runtime, out, say):
    """--batch-size auto: the run's recorded batch on resume (the same work units), else a fresh plan."""
    from dataclasses import replace

    from .memory import dummy_conditioning, plan_batch
    from .production import recorded_batch

    recorded = recorded_batch(out)
    if recorded is not None:
        batch, chunk = recorded
        say(f"batch size auto: {batch} with feedback chunk {chunk}, as recorded in {out}/run.json (resume)")
    else:
        choice = plan_batch(sampler, lambda b: dummy_conditioning(sampler, b), log=say)
        batch, chunk = choice.batch, choice.chunk
    if runtime.feedback_chunk is not None:
        chunk = runtime.feedback_chunk  # given explicitly: kept
    runtime = replace(runtime, feedback_chunk=chunk)
    sampler.runtime = runtime
    return replace(gen, batch_size=batch), runtime
