"""A deliberately plain, batch-1 port of the authors' demo loop (fg_pipe.py): the yardstick.

Read it beside docs/method.md, "Generation (per sample)": the same order, the same formulas, the scheduler's
own ``step`` for the update (DDIMScheduler in the demo; any other diffusers scheduler the same way, in a
pipeline's order: ``init_noise_sigma``, ``scale_model_input``, ``step(..., generator=)``). It keeps the demo's
extra UNet pass for the gradient, its global (whole-tensor) min-max and norms, and its stale-eps ordering (the
CFG eps is computed before the shift). Under a sigma-space scheduler the gradient is taken at the model input
x / sqrt(1 + sigma^2), whose alpha-bar is 1 / (1 + sigma^2). Flow-matching models (SD3, Flux, PixArt-style
transformers under a flow scheduler, Sana) run the same loop on x_s = (1 - s) x0 + s n with the velocity
v = n - x0 (docs/method.md, "Flow matching"): x0 = x - s v, the blend at the alpha-bar of the same
signal-to-noise ratio, shift x += g or score v -= s / (1 - s) g, and no feedback above s = 0.99. Each
transformer is called as its pipeline calls it, written out here.
Tests and benchmarks compare the engine with this function; do not optimise it.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from .conditioning import Conditioning
from .config import SamplerConfig
from .criteria import GaussianClassStats, criterion_values
from .models import Classifier, vae_scale_factor


def _unet(unet, x, t, c: Conditioning):
    """The UNet (or a transformer, as its pipeline calls it) on x with the conditional half of ``c``."""
    name = type(unet).__name__
    if name.endswith("Transformer2DModel"):
        return _transformer(unet, name, x, t, c)
    kw = {}
    if c.prompt_embeds is not None:
        kw["encoder_hidden_states"] = c.prompt_embeds
    if c.class_labels is not None:
        kw["class_labels"] = c.class_labels
    if c.added_cond_kwargs is not None:
        kw["added_cond_kwargs"] = c.added_cond_kwargs
    return unet(x, t, **kw).sample


def _transformer(model, name, x, t, c: Conditioning):
    """The four transformers' calls, as in their pipelines' denoising loops."""
    b, ch, h, w = x.shape
    ts = t.expand(b)
    if name == "SD3Transformer2DModel":
        return model(hidden_states=x, timestep=ts, encoder_hidden_states=c.prompt_embeds,
                     pooled_projections=c.pooled_projections).sample
    if name == "FluxTransformer2DModel":
        packed = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        txt_ids = torch.zeros(c.prompt_embeds.shape[1], 3)
        out = model(hidden_states=packed, timestep=ts.to(x.dtype) / 1000, guidance=c.guidance,
                    pooled_projections=c.pooled_projections, encoder_hidden_states=c.prompt_embeds,
                    txt_ids=txt_ids.to(x), img_ids=img_ids.reshape(-1, 3).to(x)).sample
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)
    if name == "PixArtTransformer2DModel":
        out = model(x, encoder_hidden_states=c.prompt_embeds, encoder_attention_mask=c.attention_mask,
                    timestep=ts, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    else:  # Sana
        out = model(x, encoder_hidden_states=c.prompt_embeds, encoder_attention_mask=c.attention_mask,
                    timestep=ts * model.config.timestep_scale).sample
    return out.chunk(2, dim=1)[0] if model.config.out_channels // 2 == ch else out


def _both(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """[uncond; cond] row-wise, as the pipelines concatenate for one CFG call."""
    def cat(a, b):
        if isinstance(a, dict):
            return {k: torch.cat([a[k], b[k]]) for k in a}
        return None if a is None else torch.cat([a, b])
    return Conditioning(cat(uncond.prompt_embeds, cond.prompt_embeds), None,
                        cat(uncond.class_labels, cond.class_labels), None,
                        cat(uncond.added_cond_kwargs, cond.added_cond_kwargs),
                        pooled_projections=cat(uncond.pooled_projections, cond.pooled_projections),
                        attention_mask=cat(uncond.attention_mask, cond.attention_mask),
                        guidance=cat(uncond.guidance, cond.guidance))


def _decode(vae, latents):
    """The pipelines' decode: the VAE's scaling (and latent statistics, where given), in the VAE's dtype."""
    if vae is None:
        return latents
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            latents = latents + cfg.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample


def _criterion(classifier, config, stats, image01, label):
    if config.classifier_size is not None:
        size = config.classifier_size
        image01 = F.interpolate(image01, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.classifier_mean, device=image01.device).view(1, -1, 1, 1)
    std = torch.tensor(config.classifier_std, device=image01.device).view(1, -1, 1, 1)
    dtype = next(classifier.parameters()).dtype  # the classifier's own (an fp16 one takes fp16 input)
    logits, features = classifier(((image01 - mean) / std).to(dtype), with_features=True)
    return criterion_values(config.criterion, logits, label, features, stats).sum()


def _alpha_bar(sched, i, t):
    """The alpha-bar of the model input at step i: 1 / (1 + sigma^2) where the scheduler has sigmas."""
    if getattr(sched, "sigmas", None) is not None:
        sigma = sched.sigmas[sched.step_index if sched.step_index is not None else i]
        return 1.0 / (1.0 + sigma.float().to(sched.timesteps.device) ** 2)
    return sched.alphas_cumprod[int(t)]


def sample_one(unet, vae, classifier, scheduler, config: SamplerConfig, cond: Conditioning, label: int,
               seed: int, stats: GaussianClassStats | None = None, *, timestep_kwargs: dict | None = None,
               default_sample_size: int | None = None):
    """One feedback-guided sample, as the demo generates it. Returns (latents, image in [0, 1], criterion).

    ``scheduler`` runs as given, or the one ``config.scheduler`` names (built from its config); the feedback
    form "auto" is shift for DDIM, DDPM, Euler (ancestral) and FlowMatchEuler, score for the others.
    ``timestep_kwargs``: ``set_timesteps`` arguments beyond the step count, as a flow pipeline passes them
    (Flux: sigmas and mu). ``default_sample_size``: a pipeline's, where the model has none (Flux)."""
    from .solvers import SHIFT_SCHEDULERS, resolve_scheduler  # configuration only: which scheduler runs

    classifier = classifier if isinstance(classifier, Classifier) else Classifier(classifier)
    sched = resolve_scheduler(scheduler, config.scheduler)
    sched = type(sched).from_config(sched.config)
    dtype, device = unet.dtype, unet.device
    kw = timestep_kwargs or {}
    sched.set_timesteps(None if "sigmas" in kw else config.num_inference_steps, device=device, **kw)
    flow = (type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
            or sched.config.get("prediction_type") == "flow_prediction")
    if config.use_feedback and not flow and sched.config.prediction_type != "epsilon":
        raise NotImplementedError("the demo loop's x0 formula assumes prediction_type='epsilon'")
    mode = config.feedback_mode
    if mode == "auto":
        mode = "shift" if type(sched).__name__ in SHIFT_SCHEDULERS else "score"
    ddim = isinstance(sched, DDIMScheduler)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    sigma_space = not flow and float(sched.init_noise_sigma) > 1.0
    y = torch.tensor([label], device=device)
    size = config.image_size or (default_sample_size or unet.config.sample_size) * vae_scale_factor(vae)
    side = size // vae_scale_factor(vae)
    channels = unet.config.in_channels // (4 if type(unet).__name__ == "FluxTransformer2DModel" else 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, channels, side, side), generator=generator, dtype=dtype)
    latents = latents.to(device) * (1.0 if flow else sched.init_noise_sigma)
    cond = cond.with_embedding_dropout([generator], config.embedding_dropout).to(device, dtype)
    w = config.guidance_scale
    if getattr(unet.config, "guidance_embeds", False):  # FLUX.1-dev: the scale as an input; true CFG on top
        cond = replace(cond, guidance=torch.full((1,), config.guidance_scale, device=device))
        w = config.true_cfg_scale
    cfg = w > 1.0
    uncond = cond.unconditional() if cfg else None
    # where a push is defined (not at a flow level above 0.99, nor at alpha-bar 0); a scheduled push elsewhere
    # moves to the next defined step (docs/method.md, "Where a push is undefined")
    if flow:
        defined = [float(sched.sigmas[i]) <= 0.99 for i in range(len(sched.timesteps))]
    else:
        defined = [float(_alpha_bar(sched, i, t)) > 0 for i, t in enumerate(sched.timesteps)]
    feedback_steps = set(config.feedback_steps(defined)) if config.use_feedback else set()

    for i, t in enumerate(sched.timesteps):
        # 1. classifier-free guidance: one UNet call on [uncond, cond] at the model input
        model_input = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        with torch.no_grad():
            if cfg:
                eps_u, eps_c = _unet(unet, torch.cat([model_input] * 2), t, _both(uncond, cond)).chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
            else:
                eps = _unet(unet, model_input, t, cond)

        # 2. feedback: a second, conditional UNet call with gradient, decode, classifier, criterion
        s_flow = float(sched.sigmas[i]) if flow else 0.0
        if i in feedback_steps:
            if flow:  # the alpha-bar of the same signal-to-noise ratio
                a = torch.tensor((1 - s_flow) ** 2 / ((1 - s_flow) ** 2 + s_flow**2), device=device)
            else:
                a = _alpha_bar(sched, i, t)
            with torch.enable_grad():
                x = model_input.detach().requires_grad_()
                e = _unet(unet, x, t, cond)
                if config.grad_path == "x0":
                    e = e.detach()
                if flow:
                    x0 = x - s_flow * e
                else:
                    x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
                fac = torch.sqrt(1 - a)
                s = x0 * fac + x * (1 - fac)
                image = _decode(vae, s) / 2 + 0.5
                image = image - image.min().detach()
                image = image / image.max().detach()
                c = _criterion(classifier, config, stats, image, y)
                grad = torch.autograd.grad(c, x)[0]
            g = grad / (grad.norm(2) + 1e-8) * model_input.norm(2) * config.feedback_scale
            if mode == "shift":  # in the latents' own scale: the model input is latents * sqrt(a) there
                latents = latents + (g / a**0.5 if sigma_space else g)
            elif flow:  # n' = n - s / c^2 g (c^2 = (1 - s)^2 + s^2), i.e. v' = v - s / ((1 - s) c^2) g
                eps = eps - s_flow / ((1 - s_flow) * ((1 - s_flow) ** 2 + s_flow**2)) * g
            else:
                eps = eps - (1 - a) ** 0.5 * g

        # 3. the scheduler's update with the eps computed before the shift
        if ddim:
            noise = None
            if config.eta > 0:
                noise = torch.randn(latents.shape, generator=generator, dtype=dtype).to(device)
            latents = sched.step(eps, t, latents, eta=config.eta, variance_noise=noise).prev_sample
        else:
            kw = {"generator": generator} if takes_generator else {}
            latents = sched.step(eps, t, latents, **kw).prev_sample

    with torch.no_grad():
        image = (_decode(vae, latents) / 2 + 0.5).clamp(0, 1)
        crit = _criterion(classifier, config, stats, image, y)
    return latents, image, crit
