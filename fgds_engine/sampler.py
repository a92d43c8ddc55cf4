"""FeedbackGuidedSampler: the batched feedback-guided DDIM loop (the engine).

Every sample of a batch gets the result it would get alone (METHOD.md, "Batching"): its own generator for the
initial noise, embedding dropout and eta noise; per-sample min-max, norms and criterion; models in eval mode.
Exact optimisations over the demo loop: the feedback gradient comes from the conditional half of the CFG pass
(no extra UNet pass), gradients are taken for the input only, reductions run in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .conditioning import Conditioning
from .config import SamplerConfig
from .criteria import GaussianClassStats
from .data import progress_bar
from .feedback import Feedback, scaled_for_backward
from .graphs import StepGraphs, graphs_unavailable
from .models import cast, decode, frozen, set_attention, unet_eps, vae_scale_factor
from .ops import check_backend, fused_guided_ddim_step, resolve_backend
from .schedule import DDIMSchedule

__all__ = ["Feedback", "FeedbackGuidedSampler", "SampleOutput", "SamplerConfig", "scaled_for_backward"]
log = logging.getLogger(__name__)


@dataclass
class SampleOutput:
    """What a sampling call returns (one row per sample).

    latents: final latents [B, C, h, w]; images: [B, 3, H, W] in [0, 1] (None for output_type="latent");
    criterion: the criterion of the final images, fp32 [B] (None for "latent"); nan: bool [B], True where the
    latents, the image or the criterion became NaN/inf at any step (such images are not clamped to black);
    pil: the images as PIL images (``generate(output_type="pil")`` only).
    """

    latents: torch.Tensor
    images: torch.Tensor | None
    criterion: torch.Tensor | None
    nan: torch.Tensor
    pil: list | None = None


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b])


class FeedbackGuidedSampler:
    """Batched feedback-guided DDIM sampler over a diffusers UNet (+ VAE) and a classifier.

    Args:
        unet: diffusers UNet2DConditionModel or UNet2DModel.
        vae: diffusers AutoencoderKL, or None for pixel-space diffusion.
        classifier: an ``nn.Module`` giving logits (timm, torchvision or plain; see ``models.Classifier``).
        scheduler: a diffusers DDIMScheduler (or its config): timesteps, betas, prediction type.
        config: a ``SamplerConfig`` (presets: ``SamplerConfig.faithful()``, ``SamplerConfig.paper()``).
        stats: ``GaussianClassStats`` or ``LowRankClassStats`` (``load_class_stats``) for ``hardness``.
        feedback: the guidance component (default: ``Feedback.from_config(classifier, vae, config)``); pass
            a ``Feedback`` subclass for a criterion of your own.
        pipe: the diffusers pipeline whose encoders ``generate()`` uses (``from_pipe`` sets it).
        image_embedder: (open_clip model, preprocess) embedding exemplars in place of the pipeline's
            image encoder (``generate(image_embeds=...)``; set by ``fgds generate --image-embedder``).
    The models are cast to ``config.dtype`` and channels-last memory format if the config asks. Otherwise
    they are left as they were given: each sampling call puts them in eval mode with parameter gradients off
    and restores their modes and flags when it returns (a UNet in training keeps training).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module | None, classifier: nn.Module, scheduler,
                 config: SamplerConfig | None = None, *, stats: GaussianClassStats | None = None,
                 feedback: Feedback | None = None, pipe=None, image_embedder=None):
        self.config = config = config or SamplerConfig()
        self.unet, self.vae, self.pipe, self.image_embedder = unet, vae, pipe, image_embedder
        self.schedule = DDIMSchedule.from_config(scheduler, config.num_inference_steps)
        self.feedback = (feedback or Feedback.from_config(
            classifier, vae, config, stats=stats, prediction_type=self.schedule.prediction_type))
        self.classifier = self.feedback.classifier
        for m in (unet, vae, self.classifier):
            cast(m, config.torch_dtype)
            if m is not None and config.channels_last:
                m.to(memory_format=torch.channels_last)
        self.feedback.to(self.device)
        self.backend, why = resolve_backend(config.backend, self.device)
        try:
            check_backend(self.backend, self.device)
        except RuntimeError as e:  # the CUDA library is not built
            raise ValueError(str(e)) from None
        log.info("fused DDIM step backend: %s (%s)", self.backend, why)
        self.attention = set_attention(config.attention, self.device, unet, vae)
        self.graphs, self.graphs_status = None, "eager (cuda_graphs=False)"
        if config.cuda_graphs:
            why = graphs_unavailable(self.device)
            if why is None:
                self.graphs, self.graphs_status = StepGraphs(), "cuda graphs"
            else:
                self.graphs_status = f"eager ({why})"
                log.info("CUDA graphs off: %s; the sampler runs eagerly (same results)", why)
        # the CFG and feedback scales as device tensors: a graphed step reads them from static buffers
        self._scales = (torch.full((1,), config.guidance_scale, device=self.device),
                        torch.full((1,), config.feedback_scale, device=self.device))

    def frozen(self):
        """Context: every model in eval mode with parameter gradients off, restored on exit."""
        return frozen(self.unet, *self.feedback.modules)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.config.image_size or self.unet.config.sample_size * vae_scale_factor(self.vae)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // vae_scale_factor(self.vae)
        return (self.unet.config.in_channels, side, side)

    # ------------------------------------------------------------------ the loop

    def sample(self, cond: Conditioning, labels, seeds, *, output_type: str = "pt",
               progress: bool = False) -> SampleOutput:
        """Generate one image per (conditioning row, target label, seed).

        Args:
            cond: ``Conditioning`` with B rows.
            labels: B target classes of the classifier (ints or a tensor).
            seeds: B ints; sample i's initial noise is ``torch.randn`` from ``Generator("cpu").manual_seed``.
            output_type: "pt" (images in [0, 1] and the final criterion) or "latent" (latents only).
            progress: show a progress bar over the steps.
        Returns:
            ``SampleOutput``.
        """
        labels = self._check_inputs(cond, labels, seeds, output_type)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with self.frozen():
            return self._sample(cond, labels, gens, output_type, progress)

    def _sample(self, cond: Conditioning, labels: torch.Tensor, gens: list[torch.Generator], output_type: str,
                progress: bool) -> SampleOutput:
        """The loop, drawing initial noise, embedding dropout and eta noise from per-sample generators."""
        cfg, dev, dt = self.config, self.device, self.dtype
        x = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=dt) for g in gens]).to(dev)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cond = cond.with_embedding_dropout(gens, cfg.embedding_dropout).to(dev, dt)
        uncond = cond.unconditional() if cfg.use_cfg else None
        nan = torch.zeros(len(gens), dtype=torch.bool, device=dev)
        steps = progress_bar(enumerate(self.schedule.timesteps.tolist()), progress, total=len(self.schedule),
                             desc="DDIM steps", unit="step")
        # timesteps and alpha-bars on the device once: no host-to-device copy inside the loop
        t_dev = self.schedule.timesteps.to(dev)
        alphas = torch.stack([torch.stack(self.schedule.alphas(i)) for i in range(len(self.schedule))])
        alphas = alphas.to(dev)
        for i, _ in steps:
            t, a_t, a_prev = t_dev[i], alphas[i, 0], alphas[i, 1]
            noise = self._eta_noise(gens) if cfg.eta > 0 else None
            step = self._graphed_step if self.graphs is not None else self._step
            x = step(cfg.is_feedback_step(i), x, t, a_t, a_prev, cond, uncond, labels, noise)
            nan |= ~torch.isfinite(x).flatten(1).all(1)  # stays on the device: no sync per step
        if output_type == "latent":
            return SampleOutput(x, None, None, nan)
        return self._finish(x, labels, nan)

    def _step(self, feedback: bool, x, t, a_t, a_prev, cond, uncond, labels, noise, scales=None):
        """One DDIM step: CFG pass (with the feedback gradient on feedback steps) and the fused update."""
        cfg = self.config
        grad = None
        if feedback:
            eps_u, eps_c, grad = self.feedback_pass(x, t, a_t, cond, uncond, labels)
        else:
            eps_u, eps_c = self.cfg_pass(x, t, cond, uncond)
        w, fs = scales if scales is not None else (cfg.guidance_scale, cfg.feedback_scale)
        return fused_guided_ddim_step(
            eps_u, eps_c, x, a_t, a_prev, guidance_scale=w, grad=grad, feedback_scale=fs,
            feedback_mode=cfg.feedback_mode, prediction_type=self.schedule.prediction_type, eta=cfg.eta,
            noise=noise, clip_sample=self.schedule.clip_sample,
            clip_sample_range=self.schedule.clip_sample_range, return_x0=False, backend=self.backend)[0]

    def _graphed_step(self, feedback: bool, x, t, a_t, a_prev, cond, uncond, labels, noise):
        """``_step`` through a CUDA graph: every input (the timestep included) is a device tensor."""
        inputs = {"x": x, "t": t, "a_t": a_t, "a_prev": a_prev, "labels": labels,
                  "noise": noise, "pe": cond.prompt_embeds, "cl": cond.class_labels,
                  "upe": None if uncond is None else uncond.prompt_embeds,
                  "ucl": None if uncond is None else uncond.class_labels,
                  "w": self._scales[0], "fs": self._scales[1]}

        def body(s):
            c = Conditioning(s["pe"], None, s["cl"], None)
            u = None if uncond is None else Conditioning(s["upe"], None, s["ucl"], None)
            return self._step(feedback, s["x"], s["t"], s["a_t"], s["a_prev"], c, u, s["labels"], s["noise"],
                              scales=(s["w"], s["fs"]))

        try:
            return self.graphs.run("feedback" if feedback else "cfg", inputs, body)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a capture this torch / model cannot do: say so, then run eagerly
            log.warning("CUDA graph capture failed (%s); the sampler runs eagerly from here",
                        str(e).splitlines()[0])
            self.graphs, self.graphs_status = None, f"eager (capture failed: {str(e).splitlines()[0]})"
            return self._step(feedback, x, t, a_t, a_prev, cond, uncond, labels, noise)

    # ------------------------------------------------------------------ diffusers pipelines

    @classmethod
    def from_pipe(cls, pipe, *, classifier: nn.Module, config: SamplerConfig | None = None,
                  stats: GaussianClassStats | None = None) -> FeedbackGuidedSampler:
        """The engine over a loaded diffusers pipeline: its UNet, VAE, scheduler config and encoders.

        Args:
            pipe: a ``StableDiffusionPipeline`` (text conditioning, as the demo code) or a
                ``StableUnCLIPImg2ImgPipeline`` (text + the noise-augmented CLIP image embedding of an
                exemplar, then the engine's embedding dropout: the paper's dual conditioning).
            classifier, config, stats: as for the constructor.
        Returns:
            a sampler whose ``generate()`` encodes prompts and exemplars with the pipeline.
        """
        from .pipe import check_pipe

        check_pipe(pipe)
        return cls(pipe.unet, pipe.vae, classifier, pipe.scheduler, config, stats=stats, pipe=pipe)

    def generate(self, prompts, exemplar_images=None, labels=None, seeds=None, *, negative_prompt=None,
                 noise_level: int = 0, image_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 progress: bool = False) -> SampleOutput:
        """Generate one image per prompt with a sampler built by ``from_pipe``.

        Args:
            prompts: B text prompts (a single string for B = 1).
            exemplar_images: B real images (PIL, or a preprocessed [B, 3, h, w] tensor) for a
                StableUnCLIP-style pipeline; None for a text-only one.
            labels: B target classes of the classifier. seeds: B ints, one generator each (as the pipeline's
                ``generator=[torch.Generator().manual_seed(s) ...]``).
            negative_prompt: as the pipeline's; noise_level: the unCLIP image-embedding noise augmentation.
            image_embeds: [B, E] image embeddings computed elsewhere (an open_clip embedder), in place of
                the pipeline's image encoder and the exemplars.
            output_type: "pil" (``out.pil`` and ``out.images``), "pt" or "latent".
        Returns:
            ``SampleOutput``; with embedding dropout 0 and feedback off, the images are the pipeline's own
            for the same seeds and guidance scale, to floating-point rounding.
        """
        from .pipe import conditioning_from_pipe

        pipe = self.pipe
        if pipe is None:
            raise ValueError("generate() needs a sampler built with "
                             "FeedbackGuidedSampler.from_pipe(pipe, ...)")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if labels is None or seeds is None:
            raise ValueError("generate() needs labels (the classifier's target classes) and seeds, one per "
                             "prompt")
        labels, seeds = torch.as_tensor(labels).reshape(-1), list(seeds)
        if not len(prompts) == len(labels) == len(seeds):
            raise ValueError(f"batch size mismatch: {len(prompts)} prompts, labels {len(labels)}, "
                             f"seeds {len(seeds)}")
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        cond = conditioning_from_pipe(pipe, prompts, exemplar_images, gens,
                                      use_cfg=self.config.use_cfg, negative_prompt=negative_prompt,
                                      noise_level=noise_level, image_embeds=image_embeds)
        labels = self._check_inputs(cond, labels, seeds, "pt" if output_type == "pil" else output_type)
        with self.frozen():
            out = self._sample(cond, labels, gens, "latent" if output_type == "latent" else "pt", progress)
        if output_type == "pil":
            from PIL import Image

            arr = (out.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
            out.pil = [Image.fromarray(a) for a in arr]
        return out

    # ------------------------------------------------------------------ the passes

    def cfg_pass(self, x, t, cond: Conditioning, uncond: Conditioning | None):
        """(eps_u, eps_c) from one UNet call on [x, x] (eps_u is None without CFG); no gradients."""
        with torch.no_grad():
            if uncond is None:
                return None, unet_eps(self.unet, x, t, cond.prompt_embeds, cond.class_labels)
            out = unet_eps(self.unet, torch.cat([x, x]), t,
                           _cat(uncond.prompt_embeds, cond.prompt_embeds),
                           _cat(uncond.class_labels, cond.class_labels))
            return out.chunk(2)

    def feedback_pass(self, x, t, a_t, cond, uncond, labels, *, chunk: int | None | str = "config"):
        """(eps_u, eps_c, dC/dx), in micro-batches of ``chunk`` samples (default: the config's)."""
        n = self.config.feedback_chunk if chunk == "config" else chunk
        if n is None or len(x) <= n:
            return self._feedback_chunk(x, t, a_t, cond, uncond, labels)
        parts = []
        for i in range(0, len(x), n):
            sl = slice(i, i + n)
            parts.append(self._feedback_chunk(x[sl], t, a_t, cond.select(sl),
                                              None if uncond is None else uncond.select(sl), labels[sl]))
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))

    def _feedback_chunk(self, x, t, a_t, cond, uncond, labels):
        """(eps_u, eps_c, dC/dx): the gradient reuses the conditional UNet call of the CFG pass (full path),
        or holds the UNet output of the CFG pass constant (x0 path)."""
        if self.feedback.grad_path == "x0":
            eps_u, eps_c = self.cfg_pass(x, t, cond, uncond)
            return eps_u, *self.feedback.gradient(x, a_t, labels, eps_c)
        eps_u = None
        if uncond is not None:
            with torch.no_grad():
                eps_u = unet_eps(self.unet, x, t, uncond.prompt_embeds, uncond.class_labels)
        eps_fn = lambda xg: unet_eps(self.unet, xg, t, cond.prompt_embeds, cond.class_labels)  # noqa: E731
        return eps_u, *self.feedback.gradient(x, a_t, labels, eps_fn)

    def _finish(self, x, labels, nan, *, chunk: int | None | str = "config") -> SampleOutput:
        """Decode the final latents, clamp to [0, 1] and score them with the criterion (no gradient), in
        micro-batches of ``chunk`` samples (default: the config's feedback chunk, which the memory plan sizes
        to fit beside the graph pools)."""
        n = self.config.feedback_chunk if chunk == "config" else chunk
        n = len(x) if n is None else n
        images, crit = [], []
        for i in range(0, len(x), n):
            with torch.no_grad():
                images.append((decode(self.vae, x[i:i + n]).float() / 2 + 0.5).clamp(0, 1))
            crit.append(self.feedback.score(images[-1], labels[i:i + n]))
        images, crit = torch.cat(images), torch.cat(crit)
        nan = nan | ~torch.isfinite(images).flatten(1).all(1) | ~torch.isfinite(crit)
        return SampleOutput(x, images, crit, nan)

    def _eta_noise(self, gens):
        return torch.stack([torch.randn(self.latent_shape, generator=g, dtype=self.dtype) for g in gens]
                           ).to(self.device)

    # ------------------------------------------------------------------ input checks

    def _check_inputs(self, cond, labels, seeds, output_type) -> torch.Tensor:
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
        if not isinstance(cond, Conditioning):
            raise ValueError(f"cond must be a Conditioning, got {type(cond).__name__}")
        labels = torch.as_tensor(labels).reshape(-1)
        seeds = list(seeds)
        if not (len(cond) == len(labels) == len(seeds)):
            raise ValueError(f"batch size mismatch: cond has {len(cond)} rows, labels {len(labels)}, "
                             f"seeds {len(seeds)}")
        if labels.is_floating_point() or not all(isinstance(s, int) for s in seeds):
            raise ValueError("labels and seeds must be integers")
        n = self.classifier.num_classes
        bad = labels[(labels < 0) | (labels >= n)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is out of the classifier's range 0..{n - 1}")
        want = self.classifier.input_size
        size = self.config.classifier_size or self.image_size
        if want is not None and want != (size, size):
            raise ValueError(f"the classifier expects {want[0]}x{want[1]} inputs but receives {size}x{size} "
                             f"images; set classifier_size={want[0]} to resize (changes the samples)")
        if self.image_size % vae_scale_factor(self.vae):
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE factor "
                             f"{vae_scale_factor(self.vae)}")
        return labels.to(self.device, torch.long)
