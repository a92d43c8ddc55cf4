"""What every solver gives the sampler's loop, and which feedback forms it defines."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..config import FEEDBACK_MODE_CHOICES
from ..ops import guide
from .registry import scheduler_label

# single-step solvers without history: the shift form (x_t += g, update with the output computed before the
# shift) is one well-defined update there (DDIM: the authors' demo code)
SHIFT_SCHEDULERS = ("DDIMScheduler", "FusedDDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def resolve_feedback_mode(mode: str, scheduler) -> str:
    """"shift" or "score" for a requested mode ("auto": shift where defined, else score); a shift request
    for a solver where it is undefined is refused in one line naming the score form."""
    if mode not in FEEDBACK_MODE_CHOICES:
        raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODE_CHOICES}, got {mode!r}")
    name = type(scheduler).__name__
    defined = name in SHIFT_SCHEDULERS
    if mode == "auto":
        return "shift" if defined else "score"
    if mode == "shift" and not defined:
        raise ValueError(f"feedback_mode 'shift' is not defined for {name}: a multistep solver's "
                         "history holds outputs of the states before the shift; use feedback_mode 'score' "
                         "(or 'auto')")
    return mode


class StepTime(NamedTuple):
    """What a solver gives step i's passes and update (``SolverRun.inputs``)."""

    x_in: torch.Tensor  # the model's input (a sigma-space scheduler's ``scale_model_input(x)``)
    t: torch.Tensor  # the timestep the model is called at
    a_t: torch.Tensor  # alpha-bar of the model input's noise level (0-d fp32 device tensor)
    a_prev: torch.Tensor | None = None  # alpha-bar after the step (the fused DDIM update only)
    noise: torch.Tensor | None = None  # DDIM's eta > 0 noise, from each sample's generator


class StepUpdate(NamedTuple):
    """What a step's graph-safe body gives ``SolverRun.after`` (``Solver.update``): a fused solver's next
    latents, or the guided model output (and the shift form's shifted x) for the scheduler's own step."""

    x_next: torch.Tensor | None = None
    output: torch.Tensor | None = None
    x_shifted: torch.Tensor | None = None


class SolverRun:
    """One batch's pass over the schedule. ``timesteps`` (on the device) has one entry per model evaluation;
    the initial noise is scaled by ``init_noise_sigma``."""

    fused: bool = False
    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0
    sigmas_host: list[float]  # per evaluation: the model input's noise level sqrt((1 - a) / a)
    t_host: list[float]  # per evaluation: the diffusion time timestep / num_train_timesteps (1: noise)

    def __len__(self) -> int:
        return len(self.timesteps)

    def pushes_at(self, i: int) -> bool:
        """Whether terms may push on step i: not where the model input is pure noise (alpha-bar 0: a flow
        schedule's s = 1, a zero-terminal-SNR schedule's first step), where x0 carries nothing of the
        sample and the score form is unbounded."""
        return not math.isinf(self.sigmas_host[i])

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """The initial latents from unit Gaussian noise: times ``init_noise_sigma``, as the pipelines do."""
        return x * self.init_noise_sigma

    def inputs(self, i: int, x: torch.Tensor) -> StepTime:
        """The model input, timestep and alpha-bars (and eta noise) of step i from the latents x."""
        raise NotImplementedError

    def after(self, i: int, x: torch.Tensor, result: StepUpdate) -> torch.Tensor:
        """The latents after step i, from x and what the step's graph-safe body gave (``Solver.update``)."""
        raise NotImplementedError


class Solver:
    """A sampler's update rule over one diffusers scheduler: ``start(gens, device)`` gives a fresh
    ``SolverRun`` per batch (diffusers schedulers keep state between steps)."""

    fused: bool = False
    scheduler = None
    num_inference_steps: int = 0

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def name(self) -> str:
        return scheduler_label(self.scheduler)

    def start(self, generators: list[torch.Generator], device: torch.device) -> SolverRun:
        raise NotImplementedError

    def push_defined(self) -> list[bool]:
        """Per step of a run, whether a term may push there (``SolverRun.pushes_at``): the same for every
        batch, read once from a run on the CPU."""
        run = self.start([], torch.device("cpu"))
        return [run.pushes_at(i) for i in range(len(run))]

    def update(self, eps_u, eps_c, s, opts, grad: torch.Tensor | None, backend: str,
               adjust=None) -> StepUpdate:
        """The graph-safe end of a step (``StepInputs`` s): the guidance combine (``adjust``: applied to its
        output before the pushes; a term's ``adjust``) and, where the solver can, its update;
        ``SolverRun.after`` finishes it."""
        raise NotImplementedError

    def first_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep, alpha-bar of the model input) of the first step, on ``device`` (memory probes)."""
        raise NotImplementedError


class EagerStep(Solver):
    """A solver whose graph-safe body ends at the guidance combine (``ops.guide``): its ``SolverRun.after``
    runs the scheduler's own ``step`` eagerly (the DDPM-family schedulers and the flow ones)."""

    def update(self, eps_u, eps_c, s, opts, grad, backend, adjust=None):
        """The guidance combine (rounded as the pipelines round it under bf16 / fp16: the scheduler's step
        after it runs in the model's dtype, as theirs): the model output and the shifted x (or None)."""
        out, x_new = guide(eps_u, eps_c, s.x, s.a_t, opts, grad, pipeline_rounding=True, adjust=adjust)
        return StepUpdate(output=out, x_shifted=x_new if x_new is not s.x else None)
