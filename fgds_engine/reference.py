"""A deliberately plain, batch-1 port of the authors' demo loop (fg_pipe.py): the yardstick.

Read it beside METHOD.md, "Generation (per sample)": the same order, the same formulas, diffusers'
own DDIMScheduler.step for the update. It keeps the demo's extra UNet pass for the gradient, its global
(whole-tensor) min-max and norms, and its stale-eps ordering (the CFG eps is computed before the shift).
Tests and benchmarks compare the engine with this function; do not optimise it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from .conditioning import Conditioning
from .config import SamplerConfig
from .criteria import GaussianClassStats, criterion_values
from .models import Classifier, vae_scale_factor


def _unet(unet, x, t, prompt_embeds, class_labels):
    kw = {}
    if prompt_embeds is not None:
        kw["encoder_hidden_states"] = prompt_embeds
    if class_labels is not None:
        kw["class_labels"] = class_labels
    return unet(x, t, **kw).sample


def _decode(vae, latents):
    return latents if vae is None else vae.decode(latents / vae.config.scaling_factor).sample


def _criterion(classifier, config, stats, image01, label):
    if config.classifier_size is not None:
        size = config.classifier_size
        image01 = F.interpolate(image01, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.classifier_mean, device=image01.device).view(1, -1, 1, 1)
    std = torch.tensor(config.classifier_std, device=image01.device).view(1, -1, 1, 1)
    dtype = next(classifier.parameters()).dtype  # the classifier's own (an fp16 one takes fp16 input)
    logits, features = classifier(((image01 - mean) / std).to(dtype), with_features=True)
    return criterion_values(config.criterion, logits, label, features, stats).sum()


def sample_one(unet, vae, classifier, scheduler, config: SamplerConfig, cond: Conditioning, label: int,
               seed: int, stats: GaussianClassStats | None = None):
    """One feedback-guided sample, as the demo generates it. Returns (latents, image in [0, 1], criterion)."""
    classifier = classifier if isinstance(classifier, Classifier) else Classifier(classifier)
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(config.num_inference_steps)
    if config.use_feedback and sched.config.prediction_type != "epsilon":
        raise NotImplementedError("the demo loop's x0 formula assumes prediction_type='epsilon'")
    dtype, device = unet.dtype, unet.device
    y = torch.tensor([label], device=device)
    side = (config.image_size or unet.config.sample_size * vae_scale_factor(vae)) // vae_scale_factor(vae)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, unet.config.in_channels, side, side), generator=generator, dtype=dtype)
    latents = latents.to(device) * sched.init_noise_sigma
    cond = cond.with_embedding_dropout([generator], config.embedding_dropout).to(device, dtype)
    cfg = config.guidance_scale > 1.0
    uncond = cond.unconditional() if cfg else None

    for i, t in enumerate(sched.timesteps):
        # 1. classifier-free guidance: one UNet call on [uncond, cond]
        with torch.no_grad():
            if cfg:
                pe = None if cond.prompt_embeds is None else torch.cat([uncond.prompt_embeds,
                                                                        cond.prompt_embeds])
                cl = None if cond.class_labels is None else torch.cat([uncond.class_labels,
                                                                       cond.class_labels])
                eps_u, eps_c = _unet(unet, torch.cat([latents] * 2), t, pe, cl).chunk(2)
                eps = eps_u + config.guidance_scale * (eps_c - eps_u)
            else:
                eps = _unet(unet, latents, t, cond.prompt_embeds, cond.class_labels)

        # 2. feedback: a second, conditional UNet call with gradient, decode, classifier, criterion
        if config.is_feedback_step(i):
            with torch.enable_grad():
                x = latents.detach().requires_grad_()
                e = _unet(unet, x, t, cond.prompt_embeds, cond.class_labels)
                if config.grad_path == "x0":
                    e = e.detach()
                a = sched.alphas_cumprod[t]
                x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
                fac = torch.sqrt(1 - a)
                s = x0 * fac + x * (1 - fac)
                image = _decode(vae, s) / 2 + 0.5
                image = image - image.min().detach()
                image = image / image.max().detach()
                c = _criterion(classifier, config, stats, image, y)
                grad = torch.autograd.grad(c, x)[0]
            g = grad / (grad.norm(2) + 1e-8) * latents.norm(2) * config.feedback_scale
            if config.feedback_mode == "shift":
                latents = latents + g
            else:
                eps = eps - (1 - a) ** 0.5 * g

        # 3. DDIM update with the eps computed before the shift
        noise = None
        if config.eta > 0:
            noise = torch.randn(latents.shape, generator=generator, dtype=dtype).to(device)
        latents = sched.step(eps, t, latents, eta=config.eta, variance_noise=noise).prev_sample

    with torch.no_grad():
        image = (_decode(vae, latents) / 2 + 0.5).clamp(0, 1)
        crit = _criterion(classifier, config, stats, image, y)
    return latents, image, crit
