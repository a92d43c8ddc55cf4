"""Feedback criteria (all maximised): ``loss``, ``entropy``, ``hardness`` (docs/method.md, "Criteria") and the
batch-level ``feature-repulsion`` (particle guidance on the classifier's features, the kernel of
``terms/repulsion.py``; the ``repulsion_scale`` term pushes the latents themselves; "repulsion" is the
criterion's old name, which warns).

Each criterion is a declared object (``Criterion``): its function maps a batch to one fp32 value per sample
(the sampler sums them, so one backward pass gives every sample its gradient), and it says what it needs --
the classifier's penultimate features, class statistics (``--stats``), the whole batch -- so config checks,
the CLI's help, ``assemble`` and micro-batching read the declarations instead of naming criteria. A new
criterion is a ``Criterion`` in ``CRITERIA`` (a batch-level one: its own file, as ``terms/repulsion.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import MOVED_CRITERIA


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against the target classes, per sample."""
    return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits), per sample (equals the demo's CE(logits, softmax(logits)))."""
    logp = F.log_softmax(_at_least_fp32(logits), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@dataclass
class GaussianClassStats:
    """Class-conditional Gaussians N(mu_y, Sigma_y) over a classifier's penultimate features.

    Fitted on the *real* training set. Few-shot classes have fewer samples than dimensions, so each class
    covariance is shrunk towards the pooled within-class covariance S_pool (an inverse-Wishart posterior mean
    with a prior of ``prior_strength`` pseudo-samples), plus a ridge relative to the average variance:

        Sigma_y = (scatter_y + k * S_pool) / (n_y - 1 + k)  +  ridge * (trace(S_pool) / D) * I

    where scatter_y = sum_i (z_i - mu_y)(z_i - mu_y)^T and S_pool = sum_y scatter_y / (N - C).
    A class with many samples keeps its own covariance; a 5-shot class leans mostly on S_pool.
    Storage is one D x D precision per class (fp32: C * D^2 * 4 bytes).
    """

    means: torch.Tensor  # [C, D]
    precisions: torch.Tensor  # [C, D, D], Sigma_y^-1
    logdets: torch.Tensor  # [C], log det Sigma_y
    counts: torch.Tensor  # [C]
    prior_strength: float = 10.0
    ridge: float = 1e-3

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
            prior_strength: float = 10.0, ridge: float = 1e-3) -> GaussianClassStats:
        """Fit the statistics from real features [N, D] and integer labels [N]."""
        z, y = features.detach().double(), labels.detach().long()
        if z.dim() != 2 or y.shape != z.shape[:1]:
            raise ValueError(f"features must be [N, D] and labels [N], got {tuple(z.shape)} and "
                             f"{tuple(y.shape)}")
        counts = torch.bincount(y, minlength=num_classes)
        if counts.numel() > num_classes:
            raise ValueError(f"labels go up to {int(y.max())} but num_classes is {num_classes}")
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: hardness statistics need every class")
        d = z.shape[1]
        means = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, z) / counts[:, None]
        centred = z - means[y]
        scatter = torch.zeros(num_classes, d, d, dtype=torch.float64)
        scatter.index_add_(0, y, centred[:, :, None] * centred[:, None, :])
        dof = max(int(z.shape[0]) - num_classes, 1)
        pooled = scatter.sum(0) / dof
        sigma = (scatter + prior_strength * pooled) / (counts[:, None, None] - 1 + prior_strength)
        sigma = sigma + ridge * pooled.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(sigma)
        precisions = torch.cholesky_inverse(chol)
        logdets = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return cls(means.float(), precisions.float(), logdets.float(), counts, prior_strength, ridge)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str) -> GaussianClassStats:
        """A copy with the tensors on ``device``."""
        return GaussianClassStats(self.means.to(device), self.precisions.to(device), self.logdets.to(device),
                                  self.counts, self.prior_strength, self.ridge)

    def nll(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-log N(z; mu_y, Sigma_y) per sample (fp32); differentiable in z."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"features have {z.shape[-1]} dimensions but the statistics have {self.dim}")
        d = z.float() - self.means[labels]
        maha = torch.einsum("bi,bij,bj->b", d, self.precisions[labels], d)
        return 0.5 * (maha + self.logdets[labels] + self.dim * math.log(2 * math.pi))

    def save(self, path: str | Path) -> None:
        """Write the statistics to a file (torch format)."""
        torch.save({"means": self.means, "precisions": self.precisions, "logdets": self.logdets,
                    "counts": self.counts, "prior_strength": self.prior_strength, "ridge": self.ridge},
                   str(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GaussianClassStats:
        """Read statistics written by :meth:`save`."""
        from .models import safe_torch_load

        s = safe_torch_load(path, map_location)
        return cls(s["means"], s["precisions"], s["logdets"], s["counts"], s["prior_strength"], s["ridge"])


@dataclass(frozen=True)
class Criterion:
    """A feedback criterion and what it needs.

    fn(logits, labels, features, stats) -> fp32 [B], maximised by feedback. ``needs_features``: the
    classifier's penultimate features; ``needs_stats``: class statistics (``GaussianClassStats`` /
    ``LowRankClassStats``, ``--stats``); ``per_sample``: False for a term of the whole batch, which couples
    the samples (feedback then runs on whole batches: no micro-batches, and a sample depends on its batch).
    """

    name: str
    help: str
    fn: Callable[..., torch.Tensor]
    needs_features: bool = False
    needs_stats: bool = False
    per_sample: bool = True


def _hardness(logits, labels, features, stats):
    return stats.nll(features, labels)


def _repulsion(logits, labels, features, stats):
    from .terms.repulsion import potential

    return potential(features, labels)


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("loss", "cross-entropy of the target class", lambda lg, y, f, s: loss(lg, y)),
    Criterion("entropy", "entropy of the classifier's prediction", lambda lg, y, f, s: entropy(lg)),
    Criterion("hardness", "-log-likelihood of the features under the class Gaussian (needs --stats)",
              _hardness, needs_features=True, needs_stats=True),
    Criterion("feature-repulsion", "batch-level: same-class samples pushed apart in the classifier's feature "
              "space (RBF kernel, median bandwidth)", _repulsion, needs_features=True, per_sample=False),
)}


def get_criterion(name: str) -> Criterion:
    """The declared criterion ``name`` (an old name warns and gives its new one), or a ValueError naming the
    choices."""
    if name in MOVED_CRITERIA:
        warnings.warn(f"criterion {name!r} is now {MOVED_CRITERIA[name]!r}; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        name = MOVED_CRITERIA[name]
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def check_criterion(name: str) -> str:
    """Return ``name`` if it is a known criterion, else raise a ValueError naming the choices."""
    return get_criterion(name).name


def criterion_help() -> str:
    """The criteria for a --help line: "loss | entropy | hardness (needs --stats) | repulsion (batch)"."""
    def tag(c):
        notes = (["needs --stats"] if c.needs_stats else []) + ([] if c.per_sample else ["batch-level"])
        return c.name + (f" ({', '.join(notes)})" if notes else "")
    return " | ".join(tag(c) for c in CRITERIA.values())


def criterion_values(name: str, logits: torch.Tensor, labels: torch.Tensor,
                     features: torch.Tensor | None = None,
                     stats: GaussianClassStats | None = None) -> torch.Tensor:
    """Per-sample fp32 values of criterion ``name`` (all maximised by feedback guidance)."""
    c = get_criterion(name)
    if c.needs_stats and stats is None:
        raise ValueError(f"criterion {name!r} needs GaussianClassStats (fit them on the real data)")
    if c.needs_features and features is None:
        raise ValueError(f"criterion {name!r} needs the classifier's penultimate features")
    return c.fn(logits, labels, features, stats)
