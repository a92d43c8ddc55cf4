"""Command-line options and TOML files mapped onto the same frozen dataclasses as the Python API.

Every field of a dataclass becomes ``--field-name``, documented with its default; a TOML file gives the same
fields in sections ([plan], [generate], [sampler], [models]). Precedence: dataclass default < TOML < flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from .data import InputError


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Where the models come from (local paths only, never the network).

    Args:
        preset: "tiny-random" builds a tiny random unCLIP pipeline and classifier (no weights at all).
        pipeline: a local diffusers pipeline folder (StableDiffusionPipeline or StableUnCLIPImg2ImgPipeline).
        classifier: "timm:<arch>" or "torchvision:<arch>"; its number of classes must match the data.
        classifier_checkpoint: local weights of the classifier (safetensors or a plain torch state dict).
        classifier_kwargs: extra keyword arguments of the timm model, as a JSON object string.
        stats: GaussianClassStats file for the hardness criterion (``fgds`` never fits it implicitly).
        image_embedder: "open_clip:<arch>": embeds the exemplars in place of the pipeline's image encoder
            (an unCLIP pipeline; the embedding width must match), with image_embedder_checkpoint.
        device: "cuda", "cuda:1", "cpu"; default cuda (the local rank's GPU under torchrun) when available.
        threads: CPU threads for torch (None: torch's default; torchrun sets 1 per process).
    """

    preset: str | None = None
    pipeline: str | None = None
    classifier: str | None = None
    classifier_checkpoint: str | None = None
    classifier_kwargs: str | None = None
    stats: str | None = None
    image_embedder: str | None = None
    image_embedder_checkpoint: str | None = None
    device: str | None = None
    threads: int | None = None


HELP = {  # one line per field; the default is appended by add_dataclass_options
    "num_inference_steps": "DDIM steps", "guidance_scale": "classifier-free guidance scale (<= 1: none)",
    "feedback_scale": "feedback push relative to ||x_t|| (0: no feedback)",
    "criterion": "loss | entropy | hardness", "feedback_every": "feedback on every k-th step",
    "feedback_window": "feedback only on steps start..stop-1 (two integers)",
    "feedback_mode": "shift (x_t += g, the demo code) | score (eps -= sqrt(1-a) g)",
    "grad_path": "full (through the UNet) | x0 (UNet output held constant; an approximation)",
    "eta": "DDIM stochasticity", "embedding_dropout": "probability of dropping the image embedding",
    "image_size": "image size in pixels (default: the UNet's)",
    "classifier_size": "resize before the classifier", "classifier_mean": "classifier input mean (3 floats)",
    "classifier_std": "classifier input std (3 floats)",
    "dtype": "cast the models: float32 | float16 | bfloat16", "channels_last": "channels-last memory format",
    "backend": "fused step backend: torch | triton | cuda | auto",
    "attention": "sdpa | xformers (CUDA) | default", "cuda_graphs": "capture the steps in CUDA graphs (CUDA)",
    "grad_scale": "fp16 underflow guard: per-sample criterion magnitude before the backward (auto)",
    "feedback_chunk": "feedback gradient pass in micro-batches of this many samples (memory)",
    "batch_size": "samples per sampler call, or auto (the largest that fits the GPU's memory)",
    "format": "imagefolder | webdataset",
    "samples_per_shard": "jobs per WebDataset tar", "max_retries": "retries of a NaN sample (derived seeds)",
    "noise_level": "unCLIP image-embedding noise augmentation", "shard": "run shard i of n, as i/n",
    "new_run": "archive the manifest of a differently configured run and start over",
    "target": "images per class after filling (default: the largest class)",
    "min_per_class": "synthetic images per class at least", "run_seed": "seed of every job seed and exemplar",
    "prompt_template": "prompt, {name} = class name", "epochs": "training epochs",
    "lr": "SGD learning rate", "momentum": "SGD momentum", "weight_decay": "weight decay",
    "schedule": "cosine | step (x0.1 at 60% and 85%)", "balanced_softmax": "Balanced Softmax loss",
    "amp": "bfloat16 autocast on CUDA", "TrainConfig.seed": "seed of the batches",
    "TrainConfig.batch_size": "images per batch (with --synthetic: half real, half synthetic)",
    "preset": "tiny-random: tiny random models (no weights; says so)",
    "pipeline": "local diffusers pipeline folder", "classifier": "timm:<arch> or torchvision:<arch>",
    "classifier_checkpoint": "local classifier weights (safetensors / state dict)",
    "classifier_kwargs": "JSON object of extra timm model arguments",
    "stats": "GaussianClassStats file (criterion hardness)",
    "image_embedder": "open_clip:<arch>: embed exemplars instead of the pipeline's image encoder",
    "image_embedder_checkpoint": "local open_clip weights",
    "device": "cuda | cuda:N | cpu (default: cuda if available)", "threads": "torch CPU threads",
}


def _base_type(tp):
    """(scalar type, is_tuple) of a field annotation such as int | None or tuple[int, int] | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_options(parser: argparse.ArgumentParser, cls, *, skip=()) -> None:
    """One ``--field-name`` per field of ``cls``; unset flags stay absent (argparse.SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_tuple = _base_type(hints[f.name])
        default = f.default
        shown = "/".join(map(str, default)) if isinstance(default, tuple) else default
        text = HELP.get(f"{cls.__name__}.{f.name}", HELP.get(f.name, f.name))
        help_ = f"{text} [default: {shown}]"
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_)
        elif f.name == "shard":
            group.add_argument(flag, type=_shard, default=argparse.SUPPRESS, metavar="I/N", help=help_)
        elif tp is int and str in typing.get_args(hints[f.name]):  # an integer or a word such as "auto"
            group.add_argument(flag, type=_int_or_word, default=argparse.SUPPRESS, help=help_)
        elif is_tuple:
            group.add_argument(flag, type=tp, nargs="+", default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_)


def _int_or_word(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like i/n, got {text!r}") from None
    return i, n


def read_toml(path: str | Path | None) -> dict:
    """The TOML file's tables ({} without a file)."""
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {p} is not valid TOML: {e}") from None


def build(cls, section: str, toml: dict, args: argparse.Namespace, **fixed):
    """``cls`` from its defaults, overridden by TOML table ``section``, then by the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    table = dict(toml.get(section, {}))
    unknown = sorted(set(table) - names)
    if unknown:
        raise InputError(f"unknown option(s) in [{section}] of the config file: {', '.join(unknown)}")
    values = {**table, **{k: v for k, v in vars(args).items() if k in names}, **fixed}
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if isinstance(v, list) and _base_type(hints[k])[1]:
            values[k] = tuple(v)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
