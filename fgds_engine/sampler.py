"""FeedbackGuidedSampler: the batched feedback-guided sampling loop (the engine), any diffusers scheduler.

Every sample of a batch gets the result it would get alone (METHOD.md, "Batching"): its own generator for the
initial noise, embedding dropout, eta noise and a stochastic scheduler's noise; per-sample min-max, norms and
criterion; models in eval mode. Exact optimisations over the demo loop: the feedback gradient comes from the
conditional half of the CFG pass (no extra UNet pass), gradients are taken for the input only, reductions run
in fp32. The update after the guidance combine is the solver's (``solvers``): DDIM's fused op, or the
scheduler's own ``step``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from .cads import annealed, embed_class_labels, embeddings_as_class_labels
from .conditioning import Conditioning, cfg_kwargs
from .config import SamplerConfig
from .criteria import GaussianClassStats
from .data import progress_bar
from .feedback import Feedback, scaled_for_backward
from .graphs import StepGraphs, graphs_unavailable
from .inputs import check_sample_inputs
from .models import cast, decode, frozen, set_attention, unet_eps, vae_dtype, vae_scale_factor
from .ops import StepOptions, check_backend, fused_guided_ddim_step, guide, resolve_backend
from .repulsion import direction as repel_direction
from .solvers import make_solver, resolve_feedback_mode, resolve_scheduler

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


def _unit(v: torch.Tensor) -> torch.Tensor:
    vf = v.float().flatten(1)
    return (vf / (vf.norm(dim=1, keepdim=True) + 1e-8)).reshape(v.shape)


def combine_pushes(grad, feedback_scale, direction, repulsion_scale):
    """(gradient, per-sample scale) that the guidance combine normalises to the sum of two pushes:
    unit(grad) * feedback_scale + unit(direction) * repulsion_scale (times ||x_t||), as one gradient d with
    scale ||d|| (the combine takes d / ||d|| * ||x_t|| * scale). Without a feedback gradient: the direction
    at the repulsion scale."""
    if grad is None:
        return direction, repulsion_scale
    fs = torch.as_tensor(feedback_scale, dtype=torch.float32, device=direction.device).reshape(-1)
    rs = torch.as_tensor(repulsion_scale, dtype=torch.float32, device=direction.device).reshape(-1)
    shape = (-1,) + (1,) * (direction.dim() - 1)
    d = _unit(grad) * fs.reshape(shape) + _unit(direction) * rs.reshape(shape)
    return d, d.flatten(1).norm(dim=1)


class FeedbackGuidedSampler:
    """Batched feedback-guided sampler over a diffusers UNet (+ VAE), a scheduler and a classifier.

    Args:
        unet: diffusers UNet2DConditionModel or UNet2DModel.
        vae: diffusers AutoencoderKL, or None for pixel-space diffusion.
        classifier: an ``nn.Module`` giving logits (timm, torchvision or plain; see ``models.Classifier``).
        scheduler: a diffusers scheduler (or a DDIM config dict): the one that runs, unless
            ``config.scheduler`` names another (built from its config). A ``DDIMScheduler`` runs the fused
            step; any other its own ``step`` (``solvers``).
        config: a ``SamplerConfig`` (presets: ``SamplerConfig.faithful()``, ``SamplerConfig.paper()``).
        stats: ``GaussianClassStats`` or ``LowRankClassStats`` (``load_class_stats``) for ``hardness``.
        feedback: the guidance component (default: ``Feedback.from_config(classifier, vae, config)``); pass
            a ``Feedback`` subclass for a criterion of your own.
        pipe: the diffusers pipeline whose encoders ``generate()`` uses (``from_pipe`` sets it), through
            its family's adapter (``sampler.adapter``, ``pipes``).
        image_embedder: (open_clip model, preprocess) embedding exemplars in place of the pipeline's
            image encoder (``generate(image_embeds=...)``; set by ``fgds generate --image-embedder``).
        upcast_vae: keep a VAE whose config says ``force_upcast`` in float32 under a float16 run (decode and
            the feedback gradient through it), as the SDXL pipeline decodes; None: as the pipeline's
            family does (SDXL yes, SD 1.x / 2.x and unCLIP no), False without a pipeline.
    The models are cast to ``config.dtype`` and channels-last memory format if the config asks. Otherwise
    they are left as they were given: each sampling call puts them in eval mode with parameter gradients off
    and restores their modes and flags when it returns (a UNet in training keeps training).
    ``sampler.scheduler``, ``sampler.feedback_mode`` (shift or score), ``sampler.backend`` and
    ``sampler.graphs_status`` say what runs.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module | None, classifier: nn.Module, scheduler,
                 config: SamplerConfig | None = None, *, stats: GaussianClassStats | None = None,
                 feedback: Feedback | None = None, pipe=None, image_embedder=None,
                 upcast_vae: bool | None = None):
        self.config = config = config or SamplerConfig()
        self.unet, self.vae, self.pipe, self.image_embedder = unet, vae, pipe, image_embedder
        self.adapter = None
        if pipe is not None:  # its family's encoders (``pipes``); any other pipeline is refused here
            from .pipes import adapter_for

            self.adapter = adapter_for(pipe)
        self.scheduler = resolve_scheduler(scheduler, config.scheduler)
        self.solver = make_solver(self.scheduler, config.num_inference_steps, backend=config.backend)
        self.feedback_mode = resolve_feedback_mode(config.feedback_mode, self.scheduler)
        if config.eta > 0 and not self.solver.fused:
            raise ValueError(f"eta is the DDIM update's stochasticity; {type(self.scheduler).__name__} draws "
                             "its own noise (if any): set eta=0")
        self.feedback = (feedback or Feedback.from_config(
            classifier, vae, config, stats=stats, prediction_type=self.solver.prediction_type))
        self.classifier = self.feedback.classifier
        if upcast_vae is None:
            upcast_vae = self.adapter is not None and self.adapter.upcasts_vae
        self.vae_dtype = vae_dtype(vae, config.torch_dtype, upcast=upcast_vae)
        upcast = vae is not None and next(vae.parameters()).dtype != torch.float32
        if upcast and self.vae_dtype == torch.float32:
            log.info("the VAE runs in float32 (its config sets force_upcast: it overflows in float16)")
        dtypes = (config.torch_dtype, self.vae_dtype, config.torch_dtype)
        for m, dt in zip((unet, vae, self.classifier), dtypes):
            cast(m, dt)
            if m is not None and config.channels_last:
                m.to(memory_format=torch.channels_last)
        self.feedback.to(self.device)
        self.backend, why = resolve_backend(config.backend, self.device)
        try:
            check_backend(self.backend, self.device)
        except RuntimeError as e:  # the CUDA library is not built
            raise ValueError(str(e)) from None
        log.info("scheduler %s, feedback %s form; fused DDIM step backend: %s (%s)", self.solver.name,
                 self.feedback_mode, self.backend, why)
        self.attention = set_attention(config.attention, self.device, unet, vae)
        self.graphs, self.graphs_status = None, "eager (cuda_graphs=False)"
        if config.cuda_graphs:
            why = graphs_unavailable(self.device)
            if why is None:
                self.graphs = StepGraphs()
                self.graphs_status = ("cuda graphs (the whole step: UNet, feedback pass, fused DDIM update)"
                                      if self.solver.fused else
                                      f"cuda graphs (UNet, feedback pass and guidance combine; the "
                                      f"{type(self.scheduler).__name__} step eagerly)")
            else:
                self.graphs_status = f"eager ({why})"
                log.info("CUDA graphs off: %s; the sampler runs eagerly (same results)", why)
        # the CFG and feedback scales as device tensors: a graphed step reads them from static buffers
        self._scales = (torch.full((1,), config.guidance_scale, device=self.device),
                        torch.full((1,), config.feedback_scale, device=self.device),
                        torch.full((1,), config.repulsion_scale, device=self.device))
        clip = self.solver.clip if self.solver.fused else (False, 1.0)
        self.step_options = StepOptions(
            guidance_scale=config.guidance_scale, feedback_scale=config.feedback_scale,
            feedback_mode=self.feedback_mode, prediction_type=self.solver.prediction_type, eta=config.eta,
            clip_sample=clip[0], clip_sample_range=clip[1])

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
        labels = check_sample_inputs(self, cond, labels, seeds, output_type)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with self.frozen():
            return self._sample(cond, labels, gens, output_type, progress)

    def _sample(self, cond: Conditioning, labels: torch.Tensor, gens: list[torch.Generator], output_type: str,
                progress: bool) -> SampleOutput:
        """The loop, drawing initial noise, embedding dropout and step noise from per-sample generators."""
        cfg, dev, dt = self.config, self.device, self.dtype
        x = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=dt) for g in gens]).to(dev)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        run = self.solver.start(gens, dev)
        if not run.fused:
            x = x * run.init_noise_sigma  # the pipeline's own scaling, a tensor for sigma-space schedulers
        cond = cond.with_embedding_dropout(gens, cfg.embedding_dropout).to(dev, dt)
        cads_on = cfg.cads is not None
        int_labels = cond.class_labels is not None and not cond.class_labels.is_floating_point()
        if cads_on and int_labels:  # as the UNet's own embeddings of them, so CADS can anneal them
            cond = embed_class_labels(self.unet, cond).to(dev, dt)
        uncond = cond.unconditional() if cfg.use_cfg else None
        nan = torch.zeros(len(gens), dtype=torch.bool, device=dev)
        with embeddings_as_class_labels(self.unet) if cads_on and int_labels else contextlib.nullcontext():
            for i in progress_bar(range(len(run)), progress, total=len(run), desc="steps", unit="step"):
                fb, rep = cfg.is_feedback_step(i), cfg.is_repulsion_step(i)
                # CADS: the conditional half annealed at this step's diffusion time (noise per sample)
                c_i = annealed(cond, cfg.cads_gamma(run.t_host[i]), gens, cfg.cads_noise,
                               cfg.cads_rescale) if cads_on else cond
                # interval CFG: outside the noise window, the conditional pass alone
                u_i = uncond if uncond is not None and cfg.cfg_at(run.sigmas_host[i]) else None
                if run.fused:  # DDIM: the whole step (passes + fused update) is one graph
                    noise = self._eta_noise(gens) if cfg.eta > 0 else None
                    x = self._run_step(fb, x, *run.inputs(i), c_i, u_i, labels, noise, rep)
                else:  # passes + guidance combine in one graph, then the scheduler's own update
                    x_in, a_t, c_in = run.model_input(i, x)
                    out, x_shifted = self._run_step(fb, x_in, run.timesteps[i], a_t, None, c_i, u_i, labels,
                                                    None, rep)
                    if x_shifted is not None:  # shift form: x_t + g, back from the model input's scale
                        x = x_shifted if c_in is None else (x_shifted.float() / c_in).to(x.dtype)
                    x = run.step(i, out, x)
                nan |= ~torch.isfinite(x).flatten(1).all(1)  # stays on the device: no sync per step
        if output_type == "latent":
            return SampleOutput(x, None, None, nan)
        return self._finish(x, labels, nan)

    def _step(self, feedback: bool, x, t, a_t, a_prev, cond, uncond, labels, noise, opts=None,
              repulsion: bool = False, repulsion_scale=None):
        """One step's graph-safe part: the CFG pass (with the feedback gradient on feedback steps; the
        particle repulsion direction on repulsion steps), then DDIM's fused update (a_prev given: returns
        x_prev) or the guidance combine for another solver's update (returns (model output, the shifted x or
        None))."""
        grad = None
        if feedback:
            eps_u, eps_c, grad = self.feedback_pass(x, t, a_t, cond, uncond, labels)
        else:
            eps_u, eps_c = self.cfg_pass(x, t, cond, uncond)
        opts = opts or self.step_options
        if repulsion:  # one gradient for the update: sum of the unit terms, at its per-sample size
            rs = self.config.repulsion_scale if repulsion_scale is None else repulsion_scale
            grad, scale = combine_pushes(grad, opts.feedback_scale, repel_direction(x, labels), rs)
            opts = replace(opts, feedback_scale=scale)
        if a_prev is not None:
            return fused_guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, opts, grad=grad, noise=noise,
                                          return_x0=False, backend=self.backend)[0]
        out, x_new = guide(eps_u, eps_c, x, a_t, opts, grad)
        return out, (x_new if x_new is not x else None)

    def _run_step(self, feedback: bool, x, t, a_t, a_prev, cond, uncond, labels, noise, repulsion=False):
        """``_step`` through a CUDA graph when the sampler has them (every input, the timestep included, a
        device tensor), else eagerly."""
        if self.graphs is None:
            return self._step(feedback, x, t, a_t, a_prev, cond, uncond, labels, noise, repulsion=repulsion)
        inputs = {"x": x, "t": t, "a_t": a_t, "a_prev": a_prev, "labels": labels, "noise": noise,
                  "w": self._scales[0], "fs": self._scales[1], "rs": self._scales[2],
                  **{"cond." + n: v for n, v in cond.flat().items()},
                  **({} if uncond is None else {"uncond." + n: v for n, v in uncond.flat().items()})}

        def body(s):
            def half(prefix):
                return Conditioning.from_flat({n[len(prefix):]: v for n, v in s.items()
                                               if n.startswith(prefix)})
            c, u = half("cond."), None if uncond is None else half("uncond.")
            opts = replace(self.step_options, guidance_scale=s["w"], feedback_scale=s["fs"])
            return self._step(feedback, s["x"], s["t"], s["a_t"], s["a_prev"], c, u, s["labels"], s["noise"],
                              opts, repulsion, s["rs"])

        kind = (("feedback" if feedback else "cfg") + ("-repulsion" if repulsion else "")
                + ("" if a_prev is not None else "-guide"))
        try:
            return self.graphs.run(kind, inputs, body)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a capture this torch / model cannot do: say so, then run eagerly
            log.warning("CUDA graph capture failed (%s); the sampler runs eagerly from here",
                        str(e).splitlines()[0])
            self.graphs, self.graphs_status = None, f"eager (capture failed: {str(e).splitlines()[0]})"
            return self._step(feedback, x, t, a_t, a_prev, cond, uncond, labels, noise, repulsion=repulsion)

    # ------------------------------------------------------------------ diffusers pipelines

    @classmethod
    def from_pipe(cls, pipe, *, classifier: nn.Module, config: SamplerConfig | None = None,
                  stats: GaussianClassStats | None = None) -> FeedbackGuidedSampler:
        """The engine over a loaded diffusers pipeline: its UNet, VAE, scheduler (the pipeline's own unless
        ``config.scheduler`` names another) and encoders; see ``pipe.sampler_from_pipe``."""
        from .pipes import sampler_from_pipe

        return sampler_from_pipe(cls, pipe, classifier=classifier, config=config, stats=stats)

    def generate(self, prompts, exemplar_images=None, labels=None, seeds=None, **kw) -> SampleOutput:
        """One image per prompt with a sampler built by ``from_pipe``; see ``pipe.generate`` for the
        arguments. With embedding dropout 0 and feedback off, the images are the pipeline's own for the
        same seeds, guidance scale and scheduler, to floating-point rounding."""
        from .pipes import generate

        return generate(self, prompts, exemplar_images, labels, seeds, **kw)

    # ------------------------------------------------------------------ the passes

    def cfg_pass(self, x, t, cond: Conditioning, uncond: Conditioning | None):
        """(eps_u, eps_c) from one UNet call on [x, x] (eps_u is None without CFG); no gradients."""
        with torch.no_grad():
            if uncond is None:
                return None, unet_eps(self.unet, x, t, cond)
            out = unet_eps(self.unet, torch.cat([x, x]), t, cfg_kwargs(uncond, cond))
            return out.chunk(2)

    def feedback_pass(self, x, t, a_t, cond, uncond, labels, *, chunk: int | None | str = "config"):
        """(eps_u, eps_c, dC/dx), in micro-batches of ``chunk`` samples (default: the config's); a batch-level
        criterion (``Criterion.per_sample`` False) on the whole batch."""
        n = self.config.feedback_chunk if chunk == "config" else chunk
        if n is None or len(x) <= n or not self.feedback.declared.per_sample:
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
                eps_u = unet_eps(self.unet, x, t, uncond)
        eps_fn = lambda xg: unet_eps(self.unet, xg, t, cond)  # noqa: E731
        return eps_u, *self.feedback.gradient(x, a_t, labels, eps_fn)

    def _finish(self, x, labels, nan, *, chunk: int | None | str = "config") -> SampleOutput:
        """Decode the final latents, clamp to [0, 1] and score them with the criterion (no gradient), in
        micro-batches of ``chunk`` samples (default: the config's feedback chunk, which the memory plan sizes
        to fit beside the graph pools)."""
        n = self.config.feedback_chunk if chunk == "config" else chunk
        n = len(x) if n is None else n
        images, crit = [], []
        per_sample = self.feedback.declared.per_sample
        for i in range(0, len(x), n):
            with torch.no_grad():
                images.append((decode(self.vae, x[i:i + n]).float() / 2 + 0.5).clamp(0, 1))
            if per_sample:
                crit.append(self.feedback.score(images[-1], labels[i:i + n]))
        images = torch.cat(images)
        crit = torch.cat(crit) if per_sample else self.feedback.score(images, labels)  # of the whole batch
        nan = nan | ~torch.isfinite(images).flatten(1).all(1) | ~torch.isfinite(crit)
        return SampleOutput(x, images, crit, nan)

    def _eta_noise(self, gens):
        return torch.stack([torch.randn(self.latent_shape, generator=g, dtype=self.dtype) for g in gens]
                           ).to(self.device)
