"""DDIM timesteps and coefficients, computed from a diffusers ``DDIMScheduler`` config.

The numbers follow ``diffusers.DDIMScheduler`` exactly (fp32 ``alphas_cumprod``, its timestep spacings and its
``prev_timestep = t - T // n`` rule), so that ``DDIMSchedule`` plus
:func:`fgds_engine.ops.formulas.ddim_step` reproduce ``DDIMScheduler.step`` to rounding.
Symbols: ``T`` = num_train_timesteps, ``n`` = inference steps,
``a_t`` = alpha-bar at timestep t (``alphas_cumprod[t]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    thresholding=False,
    clip_sample_range=1.0,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine alpha-bar (Nichol & Dhariwal 2021), as diffusers builds them."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(cfg: dict[str, Any]) -> torch.Tensor:
    """The training betas of a scheduler config (fp32)."""
    T = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:
        raise NotImplementedError(f"beta_schedule {cfg['beta_schedule']!r} is not supported")
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def make_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Inference timesteps, largest first, for one of diffusers' three spacings."""
    if num_steps < 1 or num_steps > num_train:
        raise ValueError(f"num_inference_steps must be in 1..{num_train}, got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train / num_steps
        return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def config_dict(scheduler_or_config: Any) -> dict[str, Any]:
    """A plain dict of DDIM options from a scheduler, its ``config``, or a dict (missing keys: defaults)."""
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    cfg = dict(cfg)
    return {k: cfg.get(k, v) for k, v in _DEFAULTS.items()}


@dataclass(frozen=True)
class DDIMSchedule:
    """Timesteps and per-step alpha-bars of a DDIM run.

    Args:
        timesteps: int64 [n], largest first.
        alphas_cumprod: fp32 [T], the training alpha-bars.
        final_alpha_cumprod: alpha-bar used after the last step (1.0 with ``set_alpha_to_one``).
        num_train_timesteps, prediction_type, clip_sample, clip_sample_range: as in the diffusers config.
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def from_config(cls, scheduler_or_config: Any, num_inference_steps: int) -> DDIMSchedule:
        """Build the schedule of ``num_inference_steps`` from a DDIMScheduler (or its config)."""
        cfg = config_dict(scheduler_or_config)
        if cfg["thresholding"]:
            raise NotImplementedError("dynamic thresholding is not supported by the fused DDIM step")
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise NotImplementedError(f"prediction_type {cfg['prediction_type']!r} is not supported")
        acp = torch.cumprod(1.0 - make_betas(cfg), dim=0)
        final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else acp[0].clone()
        ts = make_timesteps(cfg["num_train_timesteps"], num_inference_steps, cfg["timestep_spacing"],
                            cfg["steps_offset"])
        return cls(torch.from_numpy(ts), acp, final, cfg["num_train_timesteps"], cfg["prediction_type"],
                   bool(cfg["clip_sample"]), float(cfg["clip_sample_range"]))

    def __len__(self) -> int:
        return len(self.timesteps)

    def alphas(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, a_prev) for step i, with diffusers' rule prev = t - T // n (fp32 0-d tensors)."""
        t = int(self.timesteps[i])
        prev = t - self.num_train_timesteps // len(self)
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return self.alphas_cumprod[t], a_prev
