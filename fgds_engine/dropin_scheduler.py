"""FusedDDIMScheduler: a drop-in diffusers ``DDIMScheduler`` whose ``step()`` runs the fused guided step.

    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

``step()`` takes and returns exactly what ``DDIMScheduler.step`` does; ``guided_step()`` also takes both
noise predictions, the guidance scale and an optional feedback gradient, so that CFG combine, feedback combine
and DDIM update are one kernel launch. Arithmetic is fp32 whatever the sample's dtype (diffusers computes in
the sample's dtype), so fp16 results agree to fp16 rounding.
"""

from __future__ import annotations

import logging

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .ops import StepOptions, fused_guided_ddim_step, resolve_backend

__all__ = ["FusedDDIMScheduler"]
log = logging.getLogger(__name__)


class FusedDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` with the fused step. Set ``scheduler.backend`` to "torch" | "triton" | "cuda" |
    "auto" (default: triton on CUDA devices, torch on the CPU). Dynamic thresholding is not fused: ``step()``
    then defers to ``DDIMScheduler.step`` (said once in the log)."""

    backend: str = "auto"

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None,
             variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t-1}, as ``DDIMScheduler.step`` (same arguments, same return)."""
        if self.config.thresholding:
            if not getattr(self, "_told_thresholding", False):
                log.info("dynamic thresholding is not fused: using DDIMScheduler.step")
                self._told_thresholding = True
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        return self.guided_step(None, model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)

    def guided_step(self, noise_pred_uncond: torch.Tensor | None, noise_pred_cond: torch.Tensor, timestep,
                    sample: torch.Tensor, *, guidance_scale=1.0, grad: torch.Tensor | None = None,
                    feedback_scale=0.0, feedback_mode: str = "shift", eta: float = 0.0,
                    use_clipped_model_output: bool = False, generator=None,
                    variance_noise: torch.Tensor | None = None,
                    return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """CFG combine + feedback combine + DDIM update in one fused call.

        Args:
            noise_pred_uncond, noise_pred_cond: the model outputs of the unconditional and conditional branch
                (uncond None: no CFG, ``noise_pred_cond`` is used as is).
            timestep: the current timestep t (int or 0-d tensor). sample: x_t.
            guidance_scale: w of eps_u + w (eps_c - eps_u); float or per-sample [B] tensor.
            grad: the feedback gradient dC/dx_t (None: no feedback), normalised per sample to
                ||x_t|| * feedback_scale; feedback_mode "shift" (x_t += g, the demo code) or "score"
                (eps -= sqrt(1 - a_t) g).
            eta, use_clipped_model_output, generator, variance_noise, return_dict: as ``DDIMScheduler.step``.
        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of both.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        if self.config.thresholding:
            raise NotImplementedError("dynamic thresholding is not supported by the fused guided step")
        # 1. previous timestep by diffusers' rule t - T // n; 2. alpha-bars a_t, a_{t-1}
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that "
                                 "either `generator` or `variance_noise` stays `None`.")
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(noise_pred_cond.shape, generator=generator,
                                     device=noise_pred_cond.device, dtype=noise_pred_cond.dtype)
        backend, _ = resolve_backend(self.backend, sample.device)
        cfg = self.config
        opts = StepOptions(guidance_scale=guidance_scale, feedback_scale=feedback_scale,
                           feedback_mode=feedback_mode, prediction_type=cfg.prediction_type, eta=eta,
                           clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
                           use_clipped_model_output=use_clipped_model_output)
        prev_sample, x0 = fused_guided_ddim_step(noise_pred_uncond, noise_pred_cond, sample, a_t, a_prev,
                                                 opts, grad=grad, noise=noise, backend=backend)
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
