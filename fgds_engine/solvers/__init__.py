"""Solvers: the update that follows the guidance combine, for any diffusers scheduler.

    DDIMScheduler        ``FusedDDIM`` (ddim.py): guidance combine + DDIM update as one fused op, the whole
                         step in a CUDA graph (the fast path)
    any other scheduler  ``DiffusersSolver`` (diffusers_step.py): the UNet + feedback pass and the guidance
                         combine in a CUDA graph, then the scheduler's own ``step`` eagerly (elementwise)
    flow matching        ``FlowSolver`` (flow.py): FlowMatchEuler and DPM-Solver over flow sigmas (SD3, Flux,
                         Sana), the same split; the velocity's feedback forms (docs/method.md,
                         "Flow matching")

``resolve_scheduler(scheduler, name)`` turns a pipeline's scheduler into the one a run asks for (a short name
below or a diffusers class name, from the pipeline's config, as ``Cls.from_config(pipe.scheduler.config)``);
``make_solver`` picks the solver. The feedback gradient always comes from the model's input: a sigma-space
scheduler's ``scale_model_input(x)``, whose alpha-bar is 1 / (1 + sigma^2).

Feedback forms (docs/method.md): ``score`` (eps' = eps - sqrt(1 - a_t) g) is defined for every solver.
``shift`` (x_t += g, then the update with the output computed before the shift, the authors' demo) is defined
only for single-step solvers that keep no history: in a multistep solver (DPM-Solver++ 2M, UniPC, PNDM, LMS,
DEIS, Heun's second stage) the stored outputs of earlier steps belong to the states before the shift, so the
shifted update would mix two trajectories. There "shift" is refused in one line naming "score"; "auto" (the
default) is shift where it is defined and score elsewhere.
"""

from __future__ import annotations

import inspect

from .base import (
    FEEDBACK_MODE_CHOICES,
    SHIFT_SCHEDULERS,
    Solver,
    SolverRun,
    StepTime,
    StepUpdate,
    resolve_feedback_mode,
)
from .ddim import FusedDDIM
from .diffusers_step import DiffusersSolver
from .flow import FlowSolver, is_flow
from .registry import FLOW_SCHEDULER_NAMES, SCHEDULERS, scheduler_class, scheduler_label

__all__ = ["FEEDBACK_MODE_CHOICES", "FLOW_SCHEDULER_NAMES", "SCHEDULERS", "SHIFT_SCHEDULERS",
           "DiffusersSolver", "FlowSolver", "FusedDDIM", "Solver", "SolverRun", "StepTime", "StepUpdate",
           "is_flow", "make_solver", "resolve_feedback_mode", "resolve_scheduler", "scheduler_class",
           "scheduler_label"]

def resolve_scheduler(scheduler, name: str | None = None):
    """The scheduler a run uses: ``scheduler`` itself (a diffusers scheduler, or a config dict: DDIM) when
    ``name`` is None, else the named one built from its config (a ``SCHEDULERS`` key or a diffusers class
    name)."""
    from diffusers import DDIMScheduler

    if not hasattr(scheduler, "config"):
        scheduler = DDIMScheduler.from_config(dict(scheduler))
    if name is None:
        return scheduler
    cls_name, changes = SCHEDULERS.get(name, (name, {}))
    cls = scheduler_class(cls_name)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    # the flow shift is "shift" in FlowMatchEuler's config and "flow_shift" in DPM-Solver's
    takes = inspect.signature(cls.__init__).parameters
    for have, want in (("shift", "flow_shift"), ("flow_shift", "shift")):
        if have in config and want not in config and want in takes:
            config[want] = config.pop(have)
    new = cls.from_config({**config, **changes})
    if is_flow(new) != is_flow(scheduler):
        kinds = {True: ("a flow-matching", ", ".join(FLOW_SCHEDULER_NAMES)),
                 False: ("a DDPM-family", ", ".join(n for n in SCHEDULERS if n not in FLOW_SCHEDULER_NAMES))}
        raise ValueError(f"scheduler {name!r} is {kinds[is_flow(new)][0]} scheduler but the model's "
                         f"{type(scheduler).__name__} is {kinds[is_flow(scheduler)][0]} one: use one of "
                         f"{kinds[is_flow(scheduler)][1]}")
    return new


def make_solver(scheduler, num_inference_steps: int, *, backend: str = "torch", eta: float = 0.0,
                image_seq_len: int | None = None, flow_sigmas: str = "scheduler") -> Solver:
    """``FusedDDIM`` for a ``DDIMScheduler`` without dynamic thresholding (with DDIM's ``eta``),
    ``FlowSolver`` for a flow-matching scheduler (``image_seq_len`` and ``flow_sigmas`` as its arguments),
    else ``DiffusersSolver``."""
    from diffusers import DDIMScheduler

    if is_flow(scheduler):
        return FlowSolver(scheduler, num_inference_steps, image_seq_len=image_seq_len, sigmas=flow_sigmas)
    if isinstance(scheduler, DDIMScheduler) and not scheduler.config.thresholding:
        return FusedDDIM(scheduler, num_inference_steps, backend=backend, eta=eta)
    return DiffusersSolver(scheduler, num_inference_steps)
