"""Flow matching: schedulers of rectified-flow models (SD3, Flux, Sana), run by their own ``step``.

The state is x_s = (1 - s) x0 + s eps (s in [0, 1], 1 = pure noise) and the model predicts the velocity
v = eps - x0 (prediction type "flow"). The model input is x itself; the step carries the alpha-bar of the
same signal-to-noise ratio, a = (1 - s)^2 / ((1 - s)^2 + s^2), from which the guidance combine recovers s
(``ops.noise_coefficients``), so the feedback forms are docs/method.md's "Flow matching": shift x += g, score
eps' = eps - s / c^2 g (c^2 = (1 - s)^2 + s^2): both the variance-preserving push at the same signal-to-noise
ratio ("One push scale").

    FlowMatchEulerDiscreteScheduler      x' = x + (s_next - s) v; fixed ``shift`` or, with
                                         ``use_dynamic_shifting``, the shift mu computed from the image's
                                         sequence length as the SD3 / Flux pipelines compute it
    DPMSolverMultistepScheduler with     Sana's multistep solver over flow sigmas
    prediction_type="flow_prediction"

**Above s = 0.99 no term pushes** (``FlowRun.pushes_at``, both forms, every flow scheduler). At s = 1 (the
first step of FlowMatchEuler's schedules) x0 = x - v carries nothing of the sample and the score form's
factor s / (1 - s) is infinite; just below it (Sana's DPM-Solver starts at s = 0.9997: a factor of 3,300)
one step to a much lower s multiplies the push by that factor (measured on the tiny Sana pipeline: the
latents moved by 9x their norm at feedback scale 0.1). At s = 0.99 the factor is 99. A push scheduled there
moves to the next step where it is defined (docs/method.md, "Where a push is undefined").
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from ..ops import flow_alpha_bar
from .base import EagerStep, SolverRun, StepTime

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PUSH_MAX_SIGMA = 0.99  # no push above this flow noise level (the score form's factor s / (1 - s) > 99)


def is_flow(scheduler) -> bool:
    """Whether a scheduler integrates a flow-matching model (a flow class, or a flow prediction type: Sana's
    DPM-Solver has ``alphas_cumprod`` but predicts flow)."""
    cfg = scheduler.config
    return (any(k.__name__ in FLOW_SCHEDULERS for k in type(scheduler).__mro__)
            or cfg.get("prediction_type") == "flow_prediction" or bool(cfg.get("use_flow_sigmas")))


def dynamic_shift(scheduler, seq_len: int) -> float:
    """mu of a dynamically shifted flow schedule for an image of ``seq_len`` tokens: linear from
    (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift), as ``calculate_shift`` in the Flux
    and SD3 pipelines (defaults 256, 4096, 0.5, 1.15)."""
    c = scheduler.config
    x1, x2 = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    y1, y2 = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (y2 - y1) / (x2 - x1)
    return seq_len * m + (y1 - m * x1)


class FlowRun(SolverRun):
    def __init__(self, solver: FlowSolver, generators, device: torch.device):
        sched = type(solver.scheduler).from_config(solver.scheduler.config)
        sched.set_timesteps(device=device, **solver.timestep_kwargs())
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        self.sched, self.device = sched, device
        self.timesteps = sched.timesteps
        n = len(self.timesteps)
        sigma = sched.sigmas[:n].double().cpu()
        self.sigma_host = sigma.tolist()  # the flow noise level s of each step
        self.abar = flow_alpha_bar(sigma).to(device)
        # the variance-preserving noise level sqrt((1 - a) / a) = s / (1 - s) (inf at s = 1) and the diffusion
        # time s, for the terms (interval CFG, CADS)
        self.sigmas_host = [math.inf if s >= 1 else s / (1 - s) for s in self.sigma_host]
        self.t_host = list(self.sigma_host)
        self.step_kwargs = {"generator": list(generators)} if solver.takes_generator else {}
        self.scales_input = hasattr(sched, "scale_model_input")

    def initial(self, x):
        return x  # unit noise is x at s = 1

    def pushes_at(self, i: int) -> bool:
        return self.sigma_host[i] <= PUSH_MAX_SIGMA

    def inputs(self, i, x):
        x_in = self.sched.scale_model_input(x, self.timesteps[i]) if self.scales_input else x
        return StepTime(x_in, self.timesteps[i], self.abar[i])

    def after(self, i, x, result):
        """The shift form's x + g, then the scheduler's own step with the output computed before it."""
        if result.x_shifted is not None:
            x = result.x_shifted
        t = self.timesteps[i]
        return self.sched.step(result.output.to(x.dtype), t, x, return_dict=False, **self.step_kwargs)[0]


class FlowSolver(EagerStep):
    """A flow-matching scheduler (``is_flow``): the guidance combine in the graph, its own ``step`` after.

    Args:
        scheduler: FlowMatchEulerDiscreteScheduler or a DPMSolverMultistepScheduler predicting flow.
        num_inference_steps: steps.
        image_seq_len: the denoiser's image sequence length (``models.image_seq_len``), for a dynamically
            shifted schedule (required there).
        sigmas: "scheduler" (its own spacing: the SD3 and Sana pipelines) or "linspace" (s from 1 to 1 / n,
            evenly: the Flux pipeline's); "linspace" is ignored where the config uses flow sigmas.
    """

    prediction_type = "flow"

    def __init__(self, scheduler, num_inference_steps: int, *, image_seq_len: int | None = None,
                 sigmas: str = "scheduler"):
        name = type(scheduler).__name__
        if sigmas not in ("scheduler", "linspace"):
            raise ValueError(f"flow sigmas must be 'scheduler' or 'linspace', got {sigmas!r}")
        if scheduler.config.get("use_dynamic_shifting") and image_seq_len is None:
            raise ValueError(f"{name} shifts its schedule by the image's sequence length: pass image_seq_len")
        if num_inference_steps < 1:
            raise ValueError(f"{name}: num_inference_steps must be at least 1, got {num_inference_steps}")
        self.scheduler, self.num_inference_steps = scheduler, num_inference_steps
        self.image_seq_len, self.sigmas = image_seq_len, sigmas
        self.takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        try:
            FlowRun(self, [], torch.device("cpu"))  # a bad config fails here, not mid-run
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{name}: {str(e).splitlines()[0]}") from None

    def timestep_kwargs(self) -> dict:
        """``set_timesteps`` arguments: the step count, or the Flux pipeline's sigmas; mu where shifted by the
        image's size."""
        cfg, n = self.scheduler.config, self.num_inference_steps
        kw: dict = {"num_inference_steps": n}
        if self.sigmas == "linspace" and not cfg.get("use_flow_sigmas"):
            kw["sigmas"] = np.linspace(1.0, 1 / n, n)
        if cfg.get("use_dynamic_shifting"):
            kw["mu"] = dynamic_shift(self.scheduler, self.image_seq_len)
        return kw

    def start(self, generators, device) -> FlowRun:
        return FlowRun(self, generators, device)

    def first_inputs(self, device):
        run = self.start([], device)
        return run.timesteps[0], run.abar[0]
