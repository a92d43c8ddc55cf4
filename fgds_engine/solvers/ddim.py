"""DDIM: the guidance combine and the DDIM update as one fused op (``ops``), the whole step graph-safe."""

from __future__ import annotations

import torch

from ..schedule import DDIMSchedule
from .base import Solver, SolverRun


class FusedDDIMRun(SolverRun):
    fused = True

    def __init__(self, schedule: DDIMSchedule, device: torch.device):
        self.timesteps = schedule.timesteps.to(device)
        # alpha-bars on the device once: no host-to-device copy inside the loop
        alphas = torch.stack([torch.stack(schedule.alphas(i)) for i in range(len(schedule))])
        self.alphas = alphas.to(device)
        a = alphas[:, 0].double()
        self.sigmas_host = ((1 - a) / a).sqrt().tolist()
        self.t_host = (schedule.timesteps.double() / schedule.num_train_timesteps).tolist()

    def inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, a_t, a_prev) of step i, device tensors (static inputs of a graphed step)."""
        return self.timesteps[i], self.alphas[i, 0], self.alphas[i, 1]


class FusedDDIM(Solver):
    """A ``DDIMScheduler`` config as a ``DDIMSchedule`` (equal to diffusers' to rounding) for the fused op."""

    fused = True

    def __init__(self, scheduler, num_inference_steps: int, *, backend: str = "torch"):
        self.scheduler, self.num_inference_steps, self.backend = scheduler, num_inference_steps, backend
        self.schedule = DDIMSchedule.from_config(scheduler, num_inference_steps)

    @property
    def clip(self) -> tuple[bool, float]:
        return self.schedule.clip_sample, self.schedule.clip_sample_range

    def start(self, generators, device) -> FusedDDIMRun:
        return FusedDDIMRun(self.schedule, device)

    def first_inputs(self, device):
        return self.schedule.timesteps[:1].to(device)[0], self.schedule.alphas(0)[0].to(device)
