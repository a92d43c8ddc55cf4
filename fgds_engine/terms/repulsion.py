"""Particle repulsion (Corso et al., "Particle Guidance", ICLR 2024): a term of the whole batch that pushes
the samples of one label apart, with an RBF kernel and a median-distance bandwidth.

For rows z_i of a batch and labels y_i, over the pairs i != j with y_i == y_j:

    k_ij = exp(-||z_i - z_j||^2 / h),   h = median_{pairs} ||z_i - z_j||^2 / log(m + 1)

(m: the largest same-label group; the SVGD median heuristic particle guidance uses; h is held constant in
the gradient). The potential of sample i is -sum_j k_ij, larger when i is far from its group; its gradient
direction with respect to z_i is ``sum_j k_ij (z_i - z_j)``. A sample with no same-label partner gets 0.

Everything is fixed-shape tensor work (the median by a sort of the masked pair matrix), so it runs inside a
CUDA graph. The term couples the samples of a batch by design: a sample's push depends on its batch-mates,
so "a sample in a batch equals the sample alone" does not hold for it; production stays deterministic
because its units are fixed batches (a resumed run regenerates the same batches).
"""

from __future__ import annotations

import torch

from .base import GuidanceTerm, StepInputs, on_schedule


def _pairs(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distances [B, B] in fp32, same-label mask without the diagonal)."""
    zf = z.float().reshape(z.shape[0], -1)
    d2 = (zf[:, None, :] - zf[None, :, :]).pow(2).sum(-1)
    same = labels[:, None] == labels[None, :]
    same = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return d2, same


def bandwidth(d2: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """h = median of the same-label squared distances / log(m + 1), a 0-d fp32 tensor (1 without pairs)."""
    n = same.sum()
    vals = torch.where(same, d2, torch.full_like(d2, float("inf"))).flatten().sort().values
    k = ((n - 1).clamp_min(0) // 2).reshape(1)
    med = vals.gather(0, k).reshape(())  # the lower median of the n pair values (each pair counted twice)
    m = same.sum(1).max() + 1  # the largest group's size
    h = med / torch.log(m.float() + 1)
    return torch.where(n > 0, h.clamp_min(1e-12), torch.ones_like(h))


def kernel(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """k_ij on same-label pairs (0 elsewhere and on the diagonal), fp32 [B, B]; h detached."""
    d2, same = _pairs(z, labels)
    h = bandwidth(d2.detach(), same)
    return torch.where(same, torch.exp(-d2 / h), torch.zeros_like(d2))


def potential(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-sample value -sum_j k_ij (fp32 [B]; maximised, it spreads each label's samples)."""
    return -kernel(z, labels).sum(1)


def direction(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The repulsion direction of each sample, sum_j k_ij (z_i - z_j), shaped like z (fp32): the gradient
    of ``potential(z).sum()`` up to a positive factor per batch (4 / h), without autograd."""
    k = kernel(z, labels)
    zf = z.float().reshape(z.shape[0], -1)
    out = k.sum(1, keepdim=True) * zf - k @ zf
    return out.reshape(z.shape)


class Repulsion(GuidanceTerm):
    """The push term: ``direction`` at ``scale`` * ||x_t|| on steps ``every`` / ``window`` of ``steps`` (the
    feedback schedule, whether or not feedback is on). Batch-level; neutral at scale 0."""

    name = "repulsion"
    per_sample = False

    def __init__(self, scale: float, every: int, window: tuple[int, int] | None, steps: int):
        self.scale, self.every, self.window, self.steps = float(scale), every, window, steps

    def pushes(self, i: int) -> bool:
        return self.scale > 0 and on_schedule(i, self.every, self.window, self.steps)

    def push_stop(self, steps: int) -> int:
        return self.window[1] if self.window else self.steps

    def push(self, s: StepInputs, model_grad: torch.Tensor | None) -> torch.Tensor:
        return direction(s.x, s.labels)
