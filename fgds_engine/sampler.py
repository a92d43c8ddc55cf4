"""FeedbackGuidedSampler: the batched feedback-guided sampling loop (the engine), any diffusers scheduler.

Every sample of a batch gets the result it would get alone (docs/method.md, "Batching"): its own generator for
the initial noise, embedding dropout, eta noise and a stochastic scheduler's noise; per-sample min-max, norms
and criterion; models in eval mode. Exact optimisations over the demo loop: the feedback gradient comes from
the conditional half of the CFG pass (no extra UNet pass), gradients are taken for the input only, reductions
run in fp32. The update after the guidance combine is the solver's (``solvers``): DDIM's fused op, or the
scheduler's own ``step``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from .conditioning import Conditioning, cfg_kwargs
from .config import RuntimeOptions, SamplerConfig
from .criteria import GaussianClassStats
from .feedback import Feedback, scaled_for_backward
from .graphs import StepGraphs, graphs_unavailable
from .inputs import check_sample_inputs
from .models import (
    backbone,
    cast,
    decode,
    denoiser_output,
    frozen,
    image_seq_len,
    latent_channels,
    set_attention,
    vae_dtype,
    vae_scale_factor,
)
from .ops import StepOptions, check_backend, combine_pushes, resolve_backend
from .pipes import adapter_for, family_of_denoiser, generate, sampler_from_pipe
from .progress_bars import progress_bar
from .solvers import make_solver, resolve_feedback_mode, resolve_scheduler
from .terms import Batch, GuidanceTerm, StepInputs, Terms, from_config

__all__ = ["Feedback", "FeedbackGuidedSampler", "GuidanceTerm", "RuntimeOptions", "SampleOutput",
           "SamplerConfig", "scaled_for_backward"]
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


class FeedbackGuidedSampler:
    """Batched feedback-guided sampler over a diffusers denoiser (+ VAE), a scheduler and a classifier.

    Args:
        unet: the denoiser: diffusers UNet2DConditionModel or UNet2DModel, or a transformer of the families
            (SD3Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
            SanaTransformer2DModel; ``models.denoisers``). The name stays ``unet`` for the callers.
        vae: diffusers AutoencoderKL (or Sana's AutoencoderDC), or None for pixel-space diffusion.
        classifier: an ``nn.Module`` giving logits (timm, torchvision or plain; see ``models.Classifier``).
        scheduler: a diffusers scheduler (or a DDIM config dict): the one that runs, unless
            ``config.scheduler`` names another (built from its config). A ``DDIMScheduler`` runs the fused
            step; any other its own ``step`` (``solvers``).
        config: a ``SamplerConfig``: what the run computes (named configurations:
            ``SamplerConfig.faithful()``, ``SamplerConfig.paper()``).
        runtime: ``RuntimeOptions``: how it runs (dtype, channels-last, the fused step's backend, attention
            processors, CUDA graphs, the fp16 guard, the feedback chunk); default: as given, eagerly on CPU.
        stats: ``GaussianClassStats`` or ``LowRankClassStats`` (``load_class_stats``) for ``hardness``.
        feedback: the guidance component (default: ``Feedback.from_config(classifier, vae, config)``); pass
            a ``Feedback`` subclass for a criterion of your own.
        pipe: the diffusers pipeline whose encoders ``generate()`` uses (``from_pipe`` sets it), through
            its family's adapter (``sampler.adapter``, ``pipes``).
        image_embedder: (open_clip model, preprocess) embedding exemplars in place of the pipeline's
            image encoder (``generate(image_embeds=...)``; set by ``fgds generate --image-embedder``).
        terms: guidance terms of your own (``terms.GuidanceTerm``), after the ones the config asks for
            (``terms.from_config``: CFG, CADS, feedback, repulsion); docs/guidance.md.
        upcast_vae: keep a VAE whose config says ``force_upcast`` in float32 under a float16 run (decode and
            the feedback gradient through it), as the SDXL pipeline decodes; None: as the pipeline's
            family does (SDXL yes, SD 1.x / 2.x and unCLIP no), False without a pipeline.
    The models are cast to ``runtime.dtype`` and channels-last memory format if the runtime asks. Otherwise
    they are left as they were given: each sampling call puts them in eval mode with parameter gradients off
    and restores their modes and flags when it returns (a UNet in training keeps training).
    ``sampler.scheduler``, ``sampler.feedback_mode`` (shift or score), ``sampler.backend`` and
    ``sampler.graphs_status`` say what runs.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module | None, classifier: nn.Module, scheduler,
                 config: SamplerConfig | None = None, *, runtime: RuntimeOptions | None = None,
                 stats: GaussianClassStats | None = None,
                 feedback: Feedback | None = None, pipe=None, image_embedder=None,
                 upcast_vae: bool | None = None, terms: tuple[GuidanceTerm, ...] = ()):
        self.config = config = config or SamplerConfig()
        self.runtime = rt = runtime or config.moved_runtime or RuntimeOptions()
        # what ``with_config`` rebuilds from (the same models, runtime and extra terms)
        self._given = dict(classifier=classifier, scheduler=scheduler, stats=stats, feedback=feedback,
                           upcast_vae=upcast_vae, terms=tuple(terms))
        self._derived: dict = {}
        self.unet, self.vae, self.pipe, self.image_embedder = unet, vae, pipe, image_embedder
        # its family's encoders (``pipes``); any other pipeline is refused here
        self.adapter = adapter_for(pipe) if pipe is not None else None
        self.scheduler = resolve_scheduler(scheduler, config.scheduler)
        side = self.latent_shape[-1]
        if backbone(unet) == "FluxTransformer2DModel" and side % 2:
            raise ValueError(f"Flux packs its latents in 2x2 patches: image_size {self.image_size} gives "
                             f"{side} latent cells a side; use a multiple of {2 * vae_scale_factor(vae)}")
        # the family's schedule and latent dtype, with or without its pipeline (a transformer given directly)
        self.family = type(self.adapter) if self.adapter else family_of_denoiser(unet)
        self.solver = make_solver(self.scheduler, config.num_inference_steps, backend=rt.backend,
                                  eta=config.eta, image_seq_len=image_seq_len(unet, self.latent_shape[-1]),
                                  flow_sigmas=self.family.flow_sigmas if self.family else "scheduler")
        self.feedback_mode = resolve_feedback_mode(config.feedback_mode, self.scheduler)
        if config.eta > 0 and not self.solver.fused:
            raise ValueError(f"eta is the DDIM update's stochasticity; {type(self.scheduler).__name__} draws "
                             "its own noise (if any): set eta=0")
        self.feedback = (feedback or Feedback.from_config(
            classifier, vae, config, rt, stats=stats, prediction_type=self.solver.prediction_type))
        self.classifier = self.feedback.classifier
        # a guidance-distilled denoiser (FLUX.1-dev) takes the scale as an input: no unconditional pass
        self.guidance_embedded = bool(getattr(unet.config, "guidance_embeds", False))
        if config.true_cfg_scale != 1.0 and not self.guidance_embedded:
            raise ValueError(f"true_cfg_scale is the CFG of a guidance-distilled model (FLUX.1-dev); "
                             f"{type(unet).__name__} has no guidance embedding: its CFG scale is "
                             "guidance_scale")
        self.terms = Terms(from_config(config, per_sample_criterion=self.feedback.declared.per_sample,
                                       guidance_embedded=self.guidance_embedded) + list(terms))
        # which terms push on each step: a push scheduled where it is undefined moves to the next defined
        # step; a term that would never push is refused here (docs/method.md, "Where a push is undefined")
        adjusting = [t.name for t in self.terms if t.adjusts_output]
        if adjusting and self.solver.fused:
            raise ValueError(f"{', '.join(adjusting)} adjusts the model output, which the fused DDIM step "
                             "never forms: pick a scheduler that runs its own step "
                             "(SamplerConfig(scheduler=...))")
        self.push_defined = self.solver.push_defined()
        self.push_plan = self.terms.plan(self.push_defined)
        if upcast_vae is None:
            upcast_vae = self.adapter is not None and self.adapter.upcasts_vae
        self.vae_dtype = vae_dtype(vae, rt.torch_dtype, upcast=upcast_vae)
        upcast = vae is not None and next(vae.parameters()).dtype != torch.float32
        if upcast and self.vae_dtype == torch.float32:
            log.info("the VAE runs in float32 (its config sets force_upcast: it overflows in float16)")
        dtypes = (rt.torch_dtype, self.vae_dtype, rt.torch_dtype)
        for m, dt in zip((unet, vae, self.classifier), dtypes):
            cast(m, dt)
            if m is not None and rt.channels_last:
                m.to(memory_format=torch.channels_last)
        self.feedback.to(self.device)
        self.backend, why = resolve_backend(rt.backend, self.device)
        try:
            check_backend(self.backend, self.device)
        except RuntimeError as e:  # the CUDA library is not built
            raise ValueError(str(e)) from None
        log.info("scheduler %s, feedback %s form; fused DDIM step backend: %s (%s)", self.solver.name,
                 self.feedback_mode, self.backend, why)
        self.attention = set_attention(rt.attention, self.device, unet, vae)
        self.graphs, self.graphs_status = None, "eager (cuda_graphs=False)"
        if rt.cuda_graphs:
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
        self._scales = self.terms.scales(self.device)  # device tensors: a graph reads its static buffers
        clip = self.solver.clip if self.solver.fused else (False, 1.0)
        self.step_options = StepOptions(
            guidance_scale=config.guidance_scale, feedback_scale=config.feedback_scale,
            feedback_mode=self.feedback_mode, prediction_type=self.solver.prediction_type, eta=config.eta,
            clip_sample=clip[0], clip_sample_range=clip[1])

    def with_config(self, **changes) -> FeedbackGuidedSampler:
        """This sampler with some ``SamplerConfig`` fields changed: the same models, pipeline, runtime and
        extra terms (what a ``generate(num_inference_steps=..., guidance_scale=...)`` call runs). Itself
        where nothing changes; built once per set of changes."""
        changes = {k: v for k, v in changes.items() if getattr(self.config, k) != v}
        if not changes:
            return self
        key = tuple(sorted(changes.items()))
        if key not in self._derived:
            g = self._given
            self._derived[key] = FeedbackGuidedSampler(
                self.unet, self.vae, g["classifier"], g["scheduler"], replace(self.config, **changes),
                runtime=self.runtime, stats=g["stats"], feedback=g["feedback"], pipe=self.pipe,
                image_embedder=self.image_embedder, upcast_vae=g["upcast_vae"], terms=g["terms"])
        return self._derived[key]

    def feedback_steps(self) -> list[int]:
        """The steps feedback pushes on (0 = first): its schedule with each step where a push is undefined
        moved to the next defined one (``SamplerConfig.feedback_steps`` on this run's schedule)."""
        return [i for i, p in enumerate(self.push_plan) if any(t.through_model for t in p)]

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
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the loop's latents: float32 where the family's pipeline keeps them so under a bf16 /
        fp16 denoiser (Sana; ``PipeAdapter.float32_latents``), else the denoiser's."""
        return torch.float32 if self.family is not None and self.family.float32_latents else self.dtype

    @property
    def image_size(self) -> int:
        """The config's, else the pipeline's default (its ``default_sample_size``: Flux 128), else the
        denoiser's ``sample_size``, in latent cells times the VAE factor."""
        if self.config.image_size:
            return self.config.image_size
        side = (getattr(self.pipe, "default_sample_size", None)
                or getattr(self.unet.config, "sample_size", None))
        if side is None:
            raise ValueError(f"{type(self.unet).__name__} has no sample_size: give the image size "
                             "(SamplerConfig(image_size=...), --image-size)")
        return side * vae_scale_factor(self.vae)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // vae_scale_factor(self.vae)
        return (latent_channels(self.unet), side, side)

    # ------------------------------------------------------------------ the loop

    def sample(self, cond: Conditioning, labels, seeds, *, output_type: str = "pt", progress: bool = False,
               generators: list[torch.Generator] | None = None, resize=None) -> SampleOutput:
        """Generate one image per (conditioning row, target label, seed).

        Args:
            cond: ``Conditioning`` with B rows.
            labels: B target classes of the classifier (ints or a tensor).
            seeds: B ints; sample i's initial noise is ``torch.randn`` from ``Generator("cpu").manual_seed``.
            output_type: "pt" (images in [0, 1] and the final criterion) or "latent" (latents only).
            progress: show a progress bar over the steps.
            generators: the seeds' generators, where the caller has drawn from them already (a pipeline's
                encoders: ``generate``); default: fresh ones from the seeds.
            resize: applied to the decoded images (in [-1, 1]) before they are scored and returned (a
                pipeline's resolution binning: ``generate``).
        Returns:
            ``SampleOutput``.
        """
        labels = check_sample_inputs(self, cond, labels, seeds, output_type)
        gens = generators or [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with self.frozen():
            x, nan = self.denoise(cond, labels, gens, progress=progress)
            if output_type == "latent":
                return SampleOutput(x, None, None, nan)
            if resize is None:  # (an override of finish() need not take resize)
                return self.finish(x, labels, nan)
            return self.finish(x, labels, nan, resize=resize)

    def denoise(self, cond: Conditioning, labels: torch.Tensor, gens: list[torch.Generator], *,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop: (final latents, NaN flags per sample). Initial noise, embedding dropout and every later
        draw come from the per-sample generators; the terms act at their hook points (``terms``)."""
        dev, dt = self.device, self.dtype
        x = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=self.latent_dtype)
                         for g in gens]).to(dev)
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        run = self.solver.start(gens, dev)
        x, batch = run.initial(x), Batch(gens, run)
        nan = torch.zeros(len(gens), dtype=torch.bool, device=dev)
        with contextlib.ExitStack() as terms_context:
            cond = cond.with_embedding_dropout(gens, self.config.embedding_dropout).to(dev, dt)
            if self.guidance_embedded and cond.guidance is None:  # the scale as the model's input, in fp32
                cond = replace(cond, guidance=torch.full((len(gens),), self.config.guidance_scale,
                                                         device=dev))
            cond = self.terms.start(cond, self.unet, terms_context).to(dev, dt)
            uncond = cond.unconditional() if self.terms.unconditional is not None else None
            for i in progress_bar(range(len(run)), progress, total=len(run), desc="steps", unit="step"):
                c_i = self.terms.conditioning(i, cond, batch)  # CADS
                u_i = uncond if uncond is not None and self.terms.wants_uncond(i, batch) else None  # CFG
                at = run.inputs(i, x)  # the solver's StepTime
                s = StepInputs(at.x_in, at.t, at.a_t, at.a_prev, c_i, u_i, labels, at.noise, self._scales)
                pushing = self.push_plan[i]  # never where the run cannot push (pure noise, s > 0.99)
                adjusting = self.terms.adjusting(i, batch) if u_i is not None else ()  # SLG: CFG steps only
                x = run.after(i, x, self._run_step(pushing, s, adjusting))
                nan |= ~torch.isfinite(x).flatten(1).all(1)  # stays on the device: no sync per step
        return x, nan

    def step(self, pushing: tuple[GuidanceTerm, ...], s: StepInputs,
             adjusting: tuple[GuidanceTerm, ...] = ()):
        """One step's graph-safe part: the passes (with the gradient through the conditional pass when a
        pushing term needs it), the pushes collapsed into one (gradient, scale), then the solver's
        ``update``."""
        model_grad = None
        if any(t.through_model for t in pushing):
            eps_u, eps_c, model_grad = self.feedback_pass(s.x, s.t, s.a_t, s.cond, s.uncond, s.labels)
        else:
            eps_u, eps_c = self.cfg_pass(s.x, s.t, s.cond, s.uncond)
        grad, scale = None, 0.0
        if pushing:
            grad, scale = combine_pushes([(t.push(s, model_grad), s.scales[t.name]) for t in pushing])
        guidance = self.terms.unconditional
        w = {} if guidance is None else {"guidance_scale": s.scales[guidance.name]}
        opts = replace(self.step_options, feedback_scale=scale, **w)
        adjust = None
        if adjusting:
            def adjust(out):
                for t in adjusting:
                    out = t.adjust(s, out, eps_c, self.unet)
                return out
        return self.solver.update(eps_u, eps_c, s, opts, grad, self.backend, adjust)

    def _run_step(self, pushing: tuple[GuidanceTerm, ...], s: StepInputs,
                  adjusting: tuple[GuidanceTerm, ...] = ()):
        """``step`` through a CUDA graph when the sampler has them (one per set of pushing and adjusting
        terms), else eagerly."""
        if self.graphs is None:
            return self.step(pushing, s, adjusting)
        kind = "+".join(t.name for t in (*adjusting, *pushing)) or "passes"
        try:
            return self.graphs.run(kind, s.flat(),
                                   lambda st: self.step(pushing, StepInputs.from_flat(st), adjusting))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a capture this torch / model cannot do: say so, then run eagerly
            why = str(e).splitlines()[0]
            log.warning("CUDA graph capture failed (%s); the sampler runs eagerly from here", why)
            self.graphs, self.graphs_status = None, f"eager (capture failed: {why})"
            return self.step(pushing, s, adjusting)

    # ------------------------------------------------------------------ diffusers pipelines

    @classmethod
    def from_pipe(cls, pipe, *, classifier: nn.Module, config: SamplerConfig | None = None,
                  runtime: RuntimeOptions | None = None, stats: GaussianClassStats | None = None
                  ) -> FeedbackGuidedSampler:
        """The engine over a loaded diffusers pipeline: its UNet, VAE, scheduler (the pipeline's own unless
        ``config.scheduler`` names another) and encoders; see ``pipes.sampler_from_pipe``."""
        return sampler_from_pipe(cls, pipe, classifier=classifier, config=config, runtime=runtime,
                                 stats=stats)

    def generate(self, prompts=None, exemplar_images=None, labels=None, seeds=None, **kw) -> SampleOutput:
        """Images for prompts with a sampler built by ``from_pipe``, taking the pipeline's own call options
        (``num_inference_steps=``, ``guidance_scale=``, ``height=``, ``prompt_2=``, ...: each with the
        pipeline's meaning, or refused in one line); see ``pipes.call.generate``. With embedding dropout 0
        and feedback off, the images are the pipeline's own ``pipe(**options)`` for the same seeds."""
        return generate(self, prompts, exemplar_images, labels, seeds, **kw)

    # ------------------------------------------------------------------ the passes

    def cfg_pass(self, x, t, cond: Conditioning, uncond: Conditioning | None):
        """(eps_u, eps_c) from one UNet call on [x, x] (eps_u is None without CFG); no gradients."""
        with torch.no_grad():
            if uncond is None:
                return None, denoiser_output(self.unet, x, t, cond)
            out = denoiser_output(self.unet, torch.cat([x, x]), t, cfg_kwargs(uncond, cond))
            return out.chunk(2)

    def feedback_pass(self, x, t, a_t, cond, uncond, labels, *, chunk: int | None | str = "config"):
        """(eps_u, eps_c, dC/dx), in micro-batches of ``chunk`` samples (default: the config's); a batch-level
        criterion (``Criterion.per_sample`` False) on the whole batch."""
        n = self.runtime.feedback_chunk if chunk == "config" else chunk
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
                eps_u = denoiser_output(self.unet, x, t, uncond)
        eps_fn = lambda xg: denoiser_output(self.unet, xg, t, cond)  # noqa: E731
        return eps_u, *self.feedback.gradient(x, a_t, labels, eps_fn)

    def finish(self, x, labels, nan, *, chunk: int | None | str = "config", resize=None) -> SampleOutput:
        """Decode the final latents, clamp to [0, 1] and score them with the criterion (no gradient), in
        micro-batches of ``chunk`` samples (default: the config's feedback chunk, which the memory plan sizes
        to fit beside the graph pools)."""
        n = self.runtime.feedback_chunk if chunk == "config" else chunk
        n = len(x) if n is None else n
        images, crit = [], []
        per_sample = self.feedback.declared.per_sample
        for i in range(0, len(x), n):
            with torch.no_grad():
                decoded = decode(self.vae, x[i:i + n])
                decoded = decoded if resize is None else resize(decoded)
                images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
            if per_sample:
                crit.append(self.feedback.score(images[-1], labels[i:i + n]))
        images = torch.cat(images)
        crit = torch.cat(crit) if per_sample else self.feedback.score(images, labels)  # of the whole batch
        nan = nan | ~torch.isfinite(images).flatten(1).all(1) | ~torch.isfinite(crit)
        return SampleOutput(x, images, crit, nan)
