"""DDIM: the guidance combine and the DDIM update as one fused op (``ops``), the whole step graph-safe."""

from __future__ import annotations

import torch

from ..ops import fused_guided_ddim_step
from .base import Solver, SolverRun, StepTime, StepUpdate
from .ddim_schedule import DDIMSchedule


class FusedDDIMRun(SolverRun):
    fused = True

    def __init__(self, schedule: DDIMSchedule, device: torch.device, generators=(), eta: float = 0.0):
        self.generators, self.eta = list(generators), eta
        self.timesteps = schedule.timesteps.to(device)
        # alpha-bars on the device once: no host-to-device copy inside the loop
        alphas = torch.stack([torch.stack(schedule.alphas(i)) for i in range(len(schedule))])
        self.alphas = alphas.to(device)
        a = alphas[:, 0].double()
        self.sigmas_host = ((1 - a) / a).sqrt().tolist()
        self.t_host = (schedule.timesteps.double() / schedule.num_train_timesteps).tolist()

    def step_inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, a_t, a_prev) of step i, device tensors (static inputs of a graphed step)."""
        return self.timesteps[i], self.alphas[i, 0], self.alphas[i, 1]

    def initial(self, x):
        return x  # DDIM starts from the unit noise itself

    def inputs(self, i, x):
        """x itself, (t, a_t, a_prev), and eta > 0's noise from each sample's generator."""
        noise = None
        if self.eta > 0:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
                                 for g in self.generators]).to(x.device)
        return StepTime(x, *self.step_inputs(i), noise)

    def after(self, i, x, result):
        return result.x_next  # the body ran the whole update


class FusedDDIM(Solver):
    """A ``DDIMScheduler`` config as a ``DDIMSchedule`` (equal to diffusers' to rounding) for the fused op."""

    fused = True

    def __init__(self, scheduler, num_inference_steps: int, *, backend: str = "torch", eta: float = 0.0):
        self.scheduler, self.num_inference_steps, self.backend = scheduler, num_inference_steps, backend
        self.eta = eta
        self.schedule = DDIMSchedule.from_config(scheduler, num_inference_steps)

    @property
    def clip(self) -> tuple[bool, float]:
        return self.schedule.clip_sample, self.schedule.clip_sample_range

    def start(self, generators, device) -> FusedDDIMRun:
        return FusedDDIMRun(self.schedule, device, generators, self.eta)

    def update(self, eps_u, eps_c, s, opts, grad, backend, adjust=None):
        """CFG, the pushes and the DDIM update in one fused op: x_{t-1} (no output to adjust: the sampler
        refuses an output-adjusting term here)."""
        return StepUpdate(x_next=fused_guided_ddim_step(eps_u, eps_c, s.x, s.a_t, s.a_prev, opts, grad=grad,
                                                        noise=s.noise, return_x0=False, backend=backend)[0])

    def first_inputs(self, device):
        return self.schedule.timesteps[:1].to(device)[0], self.schedule.alphas(0)[0].to(device)
