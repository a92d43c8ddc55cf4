"""A pipeline's own call, option for option: how ``generate(**options)`` takes each ``__call__`` parameter of
the family's diffusers pipeline (docs/design.md, "Pipeline call options").

Each option of the pipeline's call is one of:

- **config**: it sets a ``SamplerConfig`` field for this call (``PipeAdapter.call_config``): the step count,
  the guidance scale with the pipeline's meaning (Flux: ``guidance_scale`` is FLUX.1-dev's embedded scale and
  does nothing for a model without the embedding, ``true_cfg_scale`` with a negative prompt is classifier-free
  guidance), ``eta``, the image side (``height`` / ``width``, multiples of what the pipeline requires);
- **encode**: it reaches the pipeline's own ``encode_prompt`` (``PipeAdapter.encode_options``: second and
  third prompts, their negatives, ``clip_skip``, ``max_sequence_length``), or repeats the rows as the
  pipeline repeats them (``num_images_per_prompt``);
- **binning**: PixArt-Sigma's and Sana's ``use_resolution_binning`` (their default: True): render at the
  bin's size for the model's sample size, then resize and crop as the pipeline does;
- **refused**: ``InputError`` (a ``ValueError``) of one line naming the option and why (``REFUSED``).

An option at the pipeline's own default changes nothing and is always taken. A name the pipeline's call
does not have is refused in one line, never a ``TypeError``.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import InputError

# options ``generate`` takes under its own names, or by the pipeline's: the pipeline name -> the way in
HANDLED = ("prompt", "negative_prompt", "output_type", "noise_level", "num_images_per_prompt", "height",
           "width", "use_resolution_binning")

_EMBEDS = ("the engine encodes prompts with the pipeline's own encoders; precomputed embeddings go through "
           "sampler.sample(Conditioning(...))")
_CALLBACK = ("the engine's loop takes no per-step callbacks (a CUDA graph replays each step); "
             "progress=True shows a progress bar")
_ATTENTION = ("attention-processor arguments (a LoRA scale) do not reach the engine's denoiser calls; fuse "
              "the LoRA into the weights (pipe.fuse_lora()) first")
_IP = "IP-Adapter image prompts are not supported by the engine"
REFUSED = {
    "generator": "pass seeds=[...]: each image's generator is torch.Generator('cpu').manual_seed(seed), as "
                 "the pipeline's generator=[...] list",
    "latents": "the engine draws each sample's initial noise from its seed; pass seeds, not latents",
    "prompt_embeds": _EMBEDS, "negative_prompt_embeds": _EMBEDS, "pooled_prompt_embeds": _EMBEDS,
    "negative_pooled_prompt_embeds": _EMBEDS, "prompt_attention_mask": _EMBEDS,
    "negative_prompt_attention_mask": _EMBEDS,
    "ip_adapter_image": _IP, "ip_adapter_image_embeds": _IP, "negative_ip_adapter_image": _IP,
    "negative_ip_adapter_image_embeds": _IP,
    "callback_on_step_end": _CALLBACK, "callback_on_step_end_tensor_inputs": _CALLBACK, "callback": _CALLBACK,
    "callback_steps": _CALLBACK,
    "cross_attention_kwargs": _ATTENTION, "joint_attention_kwargs": _ATTENTION,
    "attention_kwargs": _ATTENTION,
    "return_dict": "generate() returns a SampleOutput (images, latents, criterion)",
    "timesteps": "custom schedules are not taken: set num_inference_steps (the pipeline's own spacing)",
    "sigmas": "custom schedules are not taken: set num_inference_steps (the pipeline's own spacing)",
    "mu": "the schedule's shift is the pipeline's own, from the image's sequence length",
    "guidance_rescale": "guidance rescale (Lin et al.) is not part of the engine's guidance combine",
    "denoising_end": "the engine runs the whole schedule (no base + refiner split)",
    "original_size": "SDXL's size conditioning is the image size (original = target, crop (0, 0))",
    "target_size": "SDXL's size conditioning is the image size (original = target, crop (0, 0))",
    "crops_coords_top_left": "SDXL's size conditioning is the image size (original = target, crop (0, 0))",
    "negative_original_size": "SDXL's size conditioning is the image size (original = target, crop (0, 0))",
    "negative_target_size": "SDXL's size conditioning is the image size (original = target, crop (0, 0))",
    "negative_crops_coords_top_left": "SDXL's size conditioning is the image size (original = target, crop "
                                      "(0, 0))",
    "clean_caption": "captions are preprocessed as the pipeline's default does",
    "complex_human_instruction": "the prompt's instruction prefix is the pipeline's default",
    "image": "pass the exemplars as exemplar_images=[...]",
    "image_embeds": "pass image_embeds=... (generate's own argument)",
}


def call_parameters(pipe) -> dict:
    """The pipeline's ``__call__`` parameters and their defaults (``self`` and ``**kwargs`` left out)."""
    params = inspect.signature(type(pipe).__call__).parameters
    return {n: p.default for n, p in params.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- tensors and the like: not a default
        return False


def refusal(pipe_name: str, option: str, value) -> InputError:
    why = REFUSED.get(option, "not taken by the engine")
    return InputError(f"{pipe_name}'s {option}={value!r} is refused: {why}")


def split_options(adapter, options: dict) -> tuple[dict, dict, dict]:
    """(config changes, encode options, generate's own) of a ``generate(**options)`` call; any option the
    pipeline's call does not have, or that the engine does not take away from its default, is refused in one
    line."""
    pipe = adapter.pipe
    name = type(pipe).__name__
    params = call_parameters(pipe)
    config, encode, own = {}, {}, {}
    for option, value in options.items():
        if option not in params:
            raise InputError(f"{option} is not an option of {name}'s call (nor of generate())")
        if option in HANDLED:
            own[option] = value
        elif option in adapter.encode_options:
            encode[option] = value
        elif option in adapter.config_options:
            config.update(adapter.call_config(option, value))
        elif not _same(value, params[option]):
            raise refusal(name, option, value)
    return config, encode, own


def _side(adapter, own: dict) -> int | None:
    """The image side a call asks for (height / width), checked as the pipeline checks it; None: unset."""
    name = type(adapter.pipe).__name__
    h, w = own.get("height"), own.get("width")
    if h is None and w is None:
        return None
    if h is not None and w is not None and h != w:
        raise InputError(f"height={h} and width={w}: the engine renders square images (height = width)")
    side = h if h is not None else w
    m = adapter.size_multiple()
    if not isinstance(side, int) or side < 1 or side % m:
        raise InputError(f"{name} needs height and width divisible by {m}, got {side!r}")
    return side


def _binning(adapter, own: dict, side: int):
    """(render side, resize of the decoded images or None) under ``use_resolution_binning``."""
    params = call_parameters(adapter.pipe)
    if "use_resolution_binning" not in params or not own.get("use_resolution_binning",
                                                              params["use_resolution_binning"]):
        return side, None
    bins = adapter.resolution_bins()
    processor = adapter.pipe.image_processor
    height, width = processor.classify_height_width_bin(side, side, ratios=bins)
    if (height, width) == (side, side):
        return side, None
    if height != width:  # a square request lands on a square bin in every table diffusers ships
        raise InputError(f"{type(adapter.pipe).__name__}'s resolution bin for {side}x{side} is "
                         f"{height}x{width}: the engine renders square images; pass "
                         "use_resolution_binning=False")
    return int(height), lambda images: processor.resize_and_crop_tensor(images, side, side)


def generate(sampler, prompts=None, exemplar_images=None, labels=None, seeds=None, *, negative_prompt=None,
             noise_level: int = 0, image_embeds=None, output_type: str = "pil", progress: bool = False,
             **options):
    """Generate one image per prompt (``num_images_per_prompt`` per prompt) with a sampler built by
    ``from_pipe``, taking the pipeline's own call options (module docstring).

    Args:
        prompts: B text prompts (a single string for B = 1); the pipeline's ``prompt=`` works too.
        exemplar_images: B real images (PIL, or a preprocessed [B, 3, h, w] tensor) for a
            StableUnCLIP-style pipeline; None for a text-only one.
        labels: the classifier's target classes, one per prompt or one per image. seeds: one int per image
            (B x num_images_per_prompt; the pipeline's ``generator=[torch.Generator().manual_seed(s) ...]``).
        negative_prompt: as the pipeline's; noise_level: the unCLIP image-embedding noise augmentation.
        image_embeds: [B, E] image embeddings computed elsewhere (an open_clip embedder), in place of
            the pipeline's image encoder and the exemplars.
        output_type: "pil" (``out.pil`` and ``out.images``), "pt" or "latent".
        options: the pipeline's own ``__call__`` options (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``max_sequence_length``, ``prompt_2``, ...): each taken with the pipeline's meaning or
            refused in one line (``InputError``).
    Returns:
        ``SampleOutput``; with embedding dropout 0 and feedback off, the images are the pipeline's own
        ``pipe(**options)`` for the same seeds (tests/test_call_options.py: bit-equal in fp32 and bf16 but for
        the fused DDIM step under bf16 and Flux's batched true CFG, within their stated tolerances).
    """
    pipe, adapter = sampler.pipe, sampler.adapter
    if pipe is None:
        raise ValueError("generate() needs a sampler built with FeedbackGuidedSampler.from_pipe(pipe, ...)")
    if output_type not in ("pil", "pt", "latent"):
        raise InputError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if prompts is None:
        prompts = options.pop("prompt", None)
    elif "prompt" in options:
        raise InputError("prompt given twice: as generate()'s first argument and as prompt=")
    if prompts is None:
        raise InputError("generate() needs prompts (its first argument, or prompt=)")
    config, encode, own = split_options(adapter, options)
    adapter.check_call({**options, "negative_prompt": negative_prompt})
    k = own.get("num_images_per_prompt", 1)
    if not isinstance(k, int) or k < 1:
        raise InputError(f"num_images_per_prompt must be a positive integer, got {k!r}")
    side = _side(adapter, own)
    side = side if side is not None else config.get("image_size", sampler.image_size)
    render, resize = _binning(adapter, own, side)
    if render != sampler.image_size:
        config["image_size"] = render
    run = sampler.with_config(**config)

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(negative_prompt, str) and len(prompts) > 1:  # one negative for every prompt
        negative_prompt = [negative_prompt] * len(prompts)
    if labels is None or seeds is None:
        raise InputError("generate() needs labels (the classifier's target classes) and seeds, one per image")
    labels, seeds = torch.as_tensor(labels).reshape(-1), list(seeds)
    n = len(prompts) * k
    if len(labels) == len(prompts) and k > 1:
        labels = labels.repeat_interleave(k)
    if not len(labels) == len(seeds) == n:
        each = f" x {k} images each" if k > 1 else ""
        raise InputError(f"batch size mismatch: {len(prompts)} prompts{each}, labels {len(labels)}, "
                         f"seeds {len(seeds)}")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        use_cfg = run.terms.unconditional is not None
        cond = adapter.encode(prompts, exemplar_images, gens, use_cfg=use_cfg,
                              negative_prompt=negative_prompt, noise_level=noise_level,
                              image_embeds=image_embeds, image_size=run.image_size, num_images_per_prompt=k,
                              **encode)
    out = run.sample(cond, labels, seeds, output_type="latent" if output_type == "latent" else "pt",
                     progress=progress, generators=gens, resize=resize)
    if output_type == "pil":
        from PIL import Image

        arr = (out.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
        out.pil = [Image.fromarray(a) for a in arr]
    return out
