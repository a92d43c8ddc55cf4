"""Hardness statistics at scale: class Gaussians stored as a shared eigenbasis plus low-rank class factors.

The covariance is the one ``criteria.GaussianClassStats`` defines (an inverse-Wishart posterior mean with
``k = prior_strength`` pseudo-samples of the pooled within-class covariance, plus a ridge):

    Sigma_y = a_y scatter_y + c_y S_pool + rho I,   a_y = 1 / (n_y - 1 + k),  c_y = k a_y,
    rho = ridge * trace(S_pool) / D,                 S_pool = V diag(lam) V^T  (shared, D x D + D)

scatter_y = U_y U_y^T has rank <= n_y - 1, so with B_y = c_y S_pool + rho_y I = V diag(w_y) V^T (diagonal in
the shared basis) and G_y = sqrt(a_y) V^T U_y (D x r_y, stored in that basis):

    Sigma_y^-1 = B_y^-1 - B_y^-1 V G_y K_y^-1 G_y^T V^T B_y^-1,  K_y = I + G_y^T diag(1 / w_y) G_y  (Woodbury)
    log det Sigma_y = sum log w_y + log det K_y                                           (determinant lemma)

The fit folds K_y into the factor: with K_y = L_y L_y^T it stores H_y = G_y L_y^-T, so the Woodbury term of
d^T Sigma_y^-1 d is |H_y^T diag(1 / w_y) V^T d|^2 (fp64 at evaluation) and no r x r matrix is kept: storage
is D x D + D x sum_y r_y floats. ImageNet-LT (sum_y (n_y - 1) = 115K) fits without any cap in under 1 GB.

exactly, to rounding, when r_y = rank(scatter_y). A class with more than ``rank_cap`` independent directions
keeps the top ``rank_cap`` eigen-directions of its scatter, and the rest of its trace is spread evenly over
the directions the factor does not hold: U U^T + t (I - P_U) with t = (trace of the remainder) / (D - r_y),
written as U' U'^T + t I (U' = U with its squared singular values reduced by t) and rho_y = rho + a_y t, so
the class's total variance is kept exactly: a documented approximation (its error is measured in
tests/test_class_stats.py and benchmarks/bench_stats.py). Memory is O(D^2 + D * sum_y r_y), never C x D x D.

The fit streams: ``StreamingStatsFit.add(features, labels)`` per batch accumulates class sums, squared norms
and the total second moment in float64, and keeps each class's raw features only up to ``4 * rank_cap`` rows;
past that the buffer is replaced by its top ``2 * rank_cap`` singular directions (an incremental truncated SVD
whose dropped energy is counted into the remainder, so every class's total variance is kept exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "fgds-lowrank-class-stats-v1"


@dataclass
class LowRankClassStats:
    """Class-conditional Gaussians in the structured form above; ``nll`` is differentiable in z."""

    means: torch.Tensor  # [C, D] fp32
    basis: torch.Tensor  # [D, D] fp32, V: eigenvectors of S_pool (columns)
    pooled_eigvals: torch.Tensor  # [D] fp32, lam
    scale: torch.Tensor  # [C] fp32, c_y
    iso: torch.Tensor  # [C] fp32, rho_y
    factors: torch.Tensor  # [D, R] fp32, H_y = G_y L_y^-T side by side (K_y = L_y L_y^T; in the basis V)
    offsets: torch.Tensor  # [C + 1] int64: class y's columns are factors[:, offsets[y]:offsets[y + 1]]
    logdets: torch.Tensor  # [C] fp64
    counts: torch.Tensor  # [C]
    prior_strength: float = 10.0
    ridge: float = 1e-3
    rank_cap: int = 1280
    capped: int = 0  # classes whose scatter needed more than rank_cap directions
    _padded: tuple | None = field(default=None, repr=False, compare=False)  # for the graph-safe gather

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
            prior_strength: float = 10.0, ridge: float = 1e-3, rank_cap: int = 1280,
            batch: int = 4096) -> LowRankClassStats:
        """Fit from features [N, D] and labels [N] (streamed in batches of ``batch``)."""
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f"features must be [N, D] and labels [N], got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        fit = StreamingStatsFit(num_classes, features.shape[1], prior_strength=prior_strength, ridge=ridge,
                                rank_cap=rank_cap)
        for i in range(0, len(features), batch):
            fit.add(features[i:i + batch], labels[i:i + batch])
        return fit.finish()

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def factor(self, y: int) -> torch.Tensor:
        return self.factors[:, int(self.offsets[y]):int(self.offsets[y + 1])]

    def to(self, device: torch.device | str) -> LowRankClassStats:
        """A copy with the tensors on ``device``."""
        mv = lambda t: t.to(device)  # noqa: E731
        return LowRankClassStats(mv(self.means), mv(self.basis), mv(self.pooled_eigvals), mv(self.scale),
                                 mv(self.iso), mv(self.factors), self.offsets, mv(self.logdets), self.counts,
                                 self.prior_strength, self.ridge, self.rank_cap, self.capped)

    def nll(self, z: torch.Tensor, labels: torch.Tensor, *, graph_safe: bool | None = None) -> torch.Tensor:
        """-log N(z; mu_y, Sigma_y) per sample (fp32); differentiable in z; the Woodbury term in fp64.

        ``graph_safe`` (default: on CUDA) gathers every sample's factor columns by device-side indices, with
        static shapes and no host sync, so the feedback step stays capturable in a CUDA graph; otherwise the
        classes of the batch are looped over (less memory)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"features have {z.shape[-1]} dimensions but the statistics have {self.dim}")
        labels = labels.to(self.means.device)
        zt = (z.float() - self.means[labels]) @ self.basis  # [B, D] in the shared eigenbasis
        w = self.scale[labels, None] * self.pooled_eigvals + self.iso[labels, None]  # diag of B_y
        q = zt / w
        maha = (zt.double() * q.double()).sum(1)
        if z.is_cuda if graph_safe is None else graph_safe:
            maha = maha - self._woodbury_gathered(q, labels)
        else:
            maha = maha - self._woodbury_looped(q, labels)
        out = 0.5 * (maha + self.logdets[labels] + self.dim * math.log(2 * math.pi))
        return out.float()

    def _woodbury_looped(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """|H_y^T q|^2 per sample, one matrix product per class of the batch (host syncs: unique, nonzero)."""
        corr = torch.zeros(len(q), dtype=torch.float64, device=q.device)
        for y in labels.unique().tolist():
            h = self.factor(y)
            if h.shape[1] == 0:
                continue
            idx = (labels == y).nonzero().flatten()
            p = q[idx].double() @ h.double()  # [b, r] = L_y^-1 G_y^T B_y^-1 d
            corr = corr.index_add(0, idx, (p * p).sum(1))  # Woodbury: p^T K_y^-1 p with K_y = L L^T
        return corr

    def _woodbury_gathered(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """|H_y^T q|^2 per sample from columns gathered by device-side indices: [B, r_max] of them, padded
        with a zero column, so every shape is fixed by the batch size alone."""
        if self._padded is None or self._padded[0].device != q.device:
            r = self.offsets[1:] - self.offsets[:-1]
            r_max = max(int(r.max()), 1)
            cols = self.offsets[:-1, None] + torch.arange(r_max)  # [C, r_max]
            cols = torch.where(torch.arange(r_max) < r[:, None], cols, self.factors.shape[1])  # pad: zero col
            zero = torch.zeros(self.dim, 1, dtype=self.factors.dtype, device=self.factors.device)
            self._padded = (torch.cat([self.factors, zero], 1).to(q.device), cols.to(q.device))
        h, cols = self._padded
        hb = h[:, cols[labels]]  # [D, B, r_max]
        p = torch.einsum("bd,dbr->br", q, hb).double()  # fp32 product (memory: D x B x r_max floats)
        return (p * p).sum(1)

    def save(self, path: str | Path) -> None:
        """Write the statistics (torch format, tensors only: loads with ``weights_only=True``)."""
        torch.save({"format": FORMAT, "means": self.means, "basis": self.basis,
                    "pooled_eigvals": self.pooled_eigvals, "scale": self.scale, "iso": self.iso,
                    "factors": self.factors, "offsets": self.offsets, "logdets": self.logdets,
                    "counts": self.counts, "prior_strength": self.prior_strength, "ridge": self.ridge,
                    "rank_cap": self.rank_cap, "capped": self.capped}, str(path))

    @classmethod
    def from_state(cls, s: dict) -> LowRankClassStats:
        return cls(s["means"], s["basis"], s["pooled_eigvals"], s["scale"], s["iso"], s["factors"],
                   s["offsets"], s["logdets"], s["counts"], s["prior_strength"], s["ridge"], s["rank_cap"],
                   s["capped"])

    def stored_bytes(self) -> int:
        """Bytes of every tensor it holds."""
        ts = [self.means, self.basis, self.pooled_eigvals, self.scale, self.iso, self.factors, self.offsets,
              self.logdets, self.counts]
        return sum(t.numel() * t.element_size() for t in ts)


def load_class_stats(path: str | Path, map_location: str | torch.device = "cpu"):
    """Statistics written by ``fgds stats``: the low-rank format, or the earlier dense one (one D x D
    precision per class, still usable for small problems); anything else is refused with a clear message."""
    from .criteria import GaussianClassStats
    from .models import safe_torch_load

    s = safe_torch_load(path, map_location)
    if isinstance(s, dict) and s.get("format") == FORMAT:
        return LowRankClassStats.from_state(s)
    if isinstance(s, dict) and {"means", "precisions", "logdets"} <= set(s):
        return GaussianClassStats(s["means"], s["precisions"], s["logdets"], s["counts"], s["prior_strength"],
                                  s["ridge"])
    raise ValueError(f"{path} holds no hardness statistics (neither the low-rank nor the dense format); "
                     "write them with `fgds stats`")


class StreamingStatsFit:
    """Accumulates features batch by batch; ``finish()`` returns the ``LowRankClassStats``."""

    def __init__(self, num_classes: int, dim: int, *, prior_strength: float = 10.0, ridge: float = 1e-3,
                 rank_cap: int = 1280):
        if rank_cap < 1:
            raise ValueError(f"rank_cap must be >= 1, got {rank_cap}")
        self.c, self.d, self.k, self.ridge, self.cap = num_classes, dim, prior_strength, ridge, rank_cap
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.sqnorms = torch.zeros(num_classes, dtype=torch.float64)  # sum |z|^2: each class's exact trace
        self.second = torch.zeros(dim, dim, dtype=torch.float64)  # sum z z^T over every sample
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]  # raw or compressed rows
        self.nrows = [0] * num_classes
        self.compressed = [False] * num_classes

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch of features [n, D] with integer labels [n]."""
        z, y = features.detach().to("cpu", torch.float64), labels.detach().to("cpu", torch.long)
        if z.dim() != 2 or z.shape[1] != self.d or y.shape != z.shape[:1]:
            raise ValueError(f"features must be [n, {self.d}] and labels [n], got {tuple(z.shape)} and "
                             f"{tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.c):
            raise ValueError(f"labels must be in 0..{self.c - 1}, got {int(y.min())}..{int(y.max())}")
        self.counts += torch.bincount(y, minlength=self.c)
        self.sums.index_add_(0, y, z)
        self.sqnorms.index_add_(0, y, (z * z).sum(1))
        self.second.addmm_(z.T, z)
        for cls_ in y.unique().tolist():
            block = z[y == cls_].float()
            self.rows[cls_].append(block)
            self.nrows[cls_] += len(block)
            if self.nrows[cls_] > 4 * self.cap:
                self._compress(cls_)

    def _compress(self, y: int) -> None:
        """Replace the class's rows by their top ``2 * rank_cap`` singular directions (rows s_i v_i^T): twice
        the cap, so that the directions finally kept are estimated from a sketch that holds more."""
        a = torch.cat(self.rows[y]).double()
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        keep = (s[:2 * self.cap, None] * vh[:2 * self.cap]).float()
        self.rows[y], self.nrows[y], self.compressed[y] = [keep], len(keep), True

    def finish(self) -> LowRankClassStats:
        """The statistics (every class needs at least one sample)."""
        counts = self.counts
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: hardness statistics need every class")
        n = counts.double()
        means = self.sums / n[:, None]
        total = int(counts.sum())
        dof = max(total - self.c, 1)
        between = (self.sums / n.sqrt()[:, None]).T @ (self.sums / n.sqrt()[:, None])  # sum_y n_y mu mu^T
        pooled = (self.second - between) / dof
        pooled = (pooled + pooled.T) / 2
        lam, basis = torch.linalg.eigh(pooled)
        lam = lam.clamp_min(0)
        rho = self.ridge * float(pooled.diagonal().mean())
        a = 1.0 / (n - 1 + self.k)
        scale = self.k * a
        traces = (self.sqnorms - n * (means * means).sum(1)).clamp_min(0)  # trace(scatter_y), exact
        factors, logdets, iso, capped = [], torch.zeros(self.c, dtype=torch.float64), \
            torch.zeros(self.c, dtype=torch.float64), 0
        for y in range(self.c):
            u, kept = self._scatter_factor(y, means[y], int(counts[y]))
            capped += float(traces[y] - kept) > 1e-6 * float(traces[y])
            tail = float(traces[y] - kept) / max(self.d - u.shape[1], 1)  # mean dropped variance
            if tail > 0:  # the remainder goes to the complement of the kept directions only:
                # U U^T + tail (I - P_U) = U' U'^T + tail I with U' = U diag(sqrt(1 - tail / s_i^2))
                u = u * (1 - tail / (u * u).sum(0).clamp_min(1e-300)).clamp_min(0).sqrt()
            iso[y] = rho + a[y] * tail
            w = scale[y] * lam + iso[y]
            g = (basis.T @ u) * a[y].sqrt()  # [D, r] in the shared basis
            kmat = torch.eye(g.shape[1], dtype=torch.float64) + g.T @ (g / w[:, None])
            chol = torch.linalg.cholesky(kmat)
            logdets[y] = w.log().sum() + 2 * chol.diagonal().log().sum()
            factors.append(torch.linalg.solve_triangular(chol, g.T, upper=False).T.float())  # H = G L^-T
        offsets = torch.tensor([0] + [f.shape[1] for f in factors]).cumsum(0)
        return LowRankClassStats(means.float(), basis.float(), lam.float(), scale.float(), iso.float(),
                                 torch.cat(factors, 1), offsets, logdets, counts, self.k, self.ridge,
                                 self.cap, int(capped))

    def _scatter_factor(self, y: int, mean: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """(U [D, r] with U U^T the class scatter's top-r part, the trace that part keeps)."""
        rows = torch.cat(self.rows[y]).double()
        if not self.compressed[y]:  # exact: the centred samples themselves
            centred = rows - mean
            if n <= self.cap + 1:  # rank <= n - 1 <= cap: U = centred^T, nothing dropped
                return centred.T.contiguous(), float((centred * centred).sum())
            _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        else:  # scatter ~ rows^T rows - n mean mean^T, within the span of the rows and the mean
            q, _ = torch.linalg.qr(torch.cat([rows, mean[None]]).T)
            small = (rows @ q).T @ (rows @ q) - n * torch.outer(q.T @ mean, q.T @ mean)
            ev, evec = torch.linalg.eigh((small + small.T) / 2)
            order = ev.argsort(descending=True)
            s, vh = ev[order].clamp_min(0).sqrt(), (q @ evec[:, order]).T
        s, vh = s[:self.cap], vh[:self.cap]
        keep = s > s.max() * 1e-7 if len(s) else s > 0
        u = (vh[keep].T * s[keep])
        return u, float((s[keep] ** 2).sum())
