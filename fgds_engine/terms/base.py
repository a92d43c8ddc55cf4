"""The contract between the sampler's loop and a guidance term: the step's inputs, the batch a term sees,
and the three hook points (conditioning, passes, push)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields

import torch

from ..conditioning import Conditioning
from ..config import moved_to_defined, on_schedule  # noqa: F401  (terms import the schedule from here)
from ..solvers.base import SolverRun


@dataclass
class StepInputs:
    """Everything one step's graph-safe body reads: device tensors only, so that a flattened copy is the
    CUDA graph's static buffers (``flat`` / ``from_flat``).

    x: the model input x_t; t: the timestep; a_t: alpha-bar of x's noise level; a_prev: the DDIM update's
    previous alpha-bar (None: the solver updates eagerly after the body); cond / uncond: the two halves
    (uncond None: the conditional pass alone); labels: the classifier's targets; noise: DDIM's eta noise or
    None; scales: per term name, its scale as a [1] fp32 device tensor (CFG's: the guidance scale w).
    """

    x: torch.Tensor
    t: torch.Tensor
    a_t: torch.Tensor
    a_prev: torch.Tensor | None
    cond: Conditioning
    uncond: Conditioning | None
    labels: torch.Tensor
    noise: torch.Tensor | None = None
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    _TENSORS = ("x", "t", "a_t", "a_prev", "labels", "noise")

    def flat(self) -> dict[str, torch.Tensor | None]:
        """One name per tensor: the graph's key and its static buffers."""
        out = {n: getattr(self, n) for n in self._TENSORS}
        out.update({"scale." + n: v for n, v in self.scales.items()})
        out.update({"cond." + n: v for n, v in self.cond.flat().items()})
        if self.uncond is not None:
            out.update({"uncond." + n: v for n, v in self.uncond.flat().items()})
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor | None]) -> StepInputs:
        """The inverse of ``flat`` (over a graph's static buffers)."""
        def part(prefix):
            return {n[len(prefix):]: v for n, v in flat.items() if n.startswith(prefix)}
        uncond = part("uncond.")
        return cls(**{n: flat[n] for n in cls._TENSORS}, cond=Conditioning.from_flat(part("cond.")),
                   uncond=Conditioning.from_flat(uncond) if uncond else None, scales=part("scale."))


assert {f.name for f in fields(StepInputs)} == {*StepInputs._TENSORS, "cond", "uncond", "scales"}


@dataclass
class Batch:
    """What a term may read per step: the batch's per-sample generators and the solver's run (its
    ``sigmas_host[i]``: the model input's noise level sqrt((1 - a) / a); ``t_host[i]``: the diffusion time
    timestep / num_train_timesteps, 1 = noise)."""

    generators: list[torch.Generator]
    run: SolverRun


class GuidanceTerm:
    """One guidance technique, at the step's hook points (all optional; the defaults do nothing):

    - conditioning: ``prepare`` (once per batch), ``context`` (around the batch's loop) and
      ``conditioning(i, cond, batch)`` (the conditional half of step i; CADS);
    - passes: ``wants_uncond(i, batch)``: whether step i runs the unconditional half (CFG and its interval);
    - output: ``adjusts(i, batch)`` (host side: does step i adjust the guided model output; names the graph)
      and ``adjust(s, out, eps_c, model)`` (graph-safe: the output after classifier-free guidance, before
      any push; skip-layer guidance), on steps that run the unconditional half, for solvers that run the
      scheduler's own step (``adjusts_output``: the fused DDIM step is refused);
    - push: ``pushes(i)`` (host side: is step i scheduled; ``push_steps`` moves a push scheduled where it
      is undefined to the next defined step of ``push_stop``, and the plan picks the step's graph) and
      ``push(s, model_grad)`` (graph-safe: the direction, shaped like x). Every pushing term of a step is
      collapsed into the one (gradient, per-sample scale) the fused step takes (``ops.combine_pushes``).

    ``scale``: the term's size (relative to ||x_t|| for a push), carried in ``StepInputs.scales[name]``;
    ``through_model``: the push needs the gradient back through the conditional model pass (feedback: the
    sampler runs that pass and gives its gradient as ``model_grad``); ``per_sample``: a sample's result
    does not depend on its batch-mates (repulsion: False). A term at its neutral value (e.g. scale 0) does
    nothing at any hook point, so the bytes equal the term's absence.
    """

    name: str = "term"
    scale: float = 0.0
    through_model: bool = False
    per_sample: bool = True
    needs_uncond: bool = False  # the batch's unconditional half is encoded for it
    adjusts_output: bool = False  # it adjusts the guided model output (``adjust``)

    def prepare(self, cond: Conditioning, unet) -> Conditioning:
        return cond

    def context(self, cond: Conditioning, unet):
        return contextlib.nullcontext()

    def conditioning(self, i: int, cond: Conditioning, batch: Batch) -> Conditioning:
        return cond

    def wants_uncond(self, i: int, batch: Batch) -> bool:
        return False

    def adjusts(self, i: int, batch: Batch) -> bool:
        return False

    def adjust(self, s: StepInputs, out: torch.Tensor, eps_c: torch.Tensor, model) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} adjusts the output but defines no adjust()")

    def pushes(self, i: int) -> bool:
        return False

    def push_stop(self, steps: int) -> int:
        """The step before which a moved push must land (the end of the term's window)."""
        return steps

    def push_steps(self, defined: list[bool]) -> list[bool]:
        """Per step, whether the term pushes on a run whose pushes are defined where ``defined[i]``: its
        scheduled steps (``pushes``), each undefined one moved to the next defined step
        (``moved_to_defined``; docs/method.md, "Where a push is undefined")."""
        n = len(defined)
        return moved_to_defined([self.pushes(i) for i in range(n)], defined, self.push_stop(n))

    def push(self, s: StepInputs, model_grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} pushes but defines no push()")
