"""Hardness statistics at ImageNet-LT scale: the streaming low-rank fit against the dense representation.

    python benchmarks/bench_stats.py [--classes 1000] [--dim 2048] [--rank-cap 1280] [--json PATH]

Synthetic features (no dataset here): C classes with an ImageNet-LT-like count profile, 1,280 images for the
head class down to 5 for the tail (n_i = 5 + 1275 (1 - i / (C - 1))^10.5: about 116K images for C = 1000, as
ImageNet-LT's 115.8K), each feature a class mean plus a shared 64-dimensional structure with class-specific
scales plus isotropic noise, generated and fed in shuffled batches of 4,096 (never all held at once).
Measured in this process: the fit's wall time and peak resident memory, the stored size (the file and the
tensors), the time of nll + its gradient for a batch of 32 mixed labels, and the rank cap's error: for a few
classes, the exact dense Sigma_y (built from the same exact pooled covariance and the class's own samples)
against the low-rank one on held-out samples. The dense representation's size, C x D x D fp32 precisions, is
computed (16.8 GB at C = 1000, D = 2048), not allocated.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from fgds_engine.bench import commit, device_name, versions
from fgds_engine.class_stats import StreamingStatsFit


def profile(classes: int) -> torch.Tensor:
    i = torch.arange(classes, dtype=torch.float64)
    return (5 + 1275 * (1 - i / max(classes - 1, 1)) ** 10.5).round().long()


class Features:
    """Deterministic synthetic features: class c's sample j is the same whenever it is drawn."""

    def __init__(self, classes: int, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.means = torch.randn(classes, dim, generator=g)
        self.mix = torch.randn(dim, 64, generator=g) / 4
        self.scales = 0.5 + torch.rand(classes, 64, generator=g)
        self.seed = seed

    def draw(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(labels), self.means.shape[1])
        for k, (c, j) in enumerate(zip(labels.tolist(), index.tolist())):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c * 10_007 + j)
            eps = torch.randn(64 + self.means.shape[1], generator=g)
            out[k] = self.means[c] + self.mix @ (eps[:64] * self.scales[c]) + 0.5 * eps[64:]
        return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def dense_nll(z, mean, scatter, n, pooled, k, ridge):
    """The dense definition for one class (criteria.GaussianClassStats), float64."""
    d = pooled.shape[0]
    sigma = (scatter + k * pooled) / (n - 1 + k)
    sigma = sigma + ridge * pooled.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(sigma)
    diff = (z.double() - mean).T
    sol = torch.cholesky_solve(diff, chol)
    maha = (diff * sol).sum(0)
    logdet = 2 * chol.diagonal().log().sum()
    return 0.5 * (maha + logdet + d * math.log(2 * math.pi))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rank-cap", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", default="benchmarks/results/bench_stats-cpu.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    counts = profile(args.classes)
    labels = torch.repeat_interleave(torch.arange(args.classes), counts)
    index = torch.cat([torch.arange(int(n)) for n in counts])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    labels, index = labels[perm], index[perm]
    feats = Features(args.classes, args.dim)
    print(f"{args.classes} classes x {args.dim} dims, {len(labels)} samples (head {int(counts[0])}, tail "
          f"{int(counts[-1])}), rank cap {args.rank_cap}")
    rss0 = peak_rss_gib()
    t_gen, t0 = 0.0, time.perf_counter()
    fit = StreamingStatsFit(args.classes, args.dim, rank_cap=args.rank_cap)
    for i in range(0, len(labels), args.batch):
        tg = time.perf_counter()
        z = feats.draw(labels[i:i + args.batch], index[i:i + args.batch])
        t_gen += time.perf_counter() - tg
        fit.add(z, labels[i:i + args.batch])
        print(f"\r  fed {min(i + args.batch, len(labels))}/{len(labels)}", end="", flush=True)
    t_add = time.perf_counter() - t0 - t_gen
    t1 = time.perf_counter()
    stats = fit.finish()
    t_finish = time.perf_counter() - t1
    rss = peak_rss_gib()
    print(f"\n  fit: {t_add:.0f} s streaming + {t_finish:.0f} s finishing (feature generation {t_gen:.0f} s "
          f"apart); peak RSS {rss:.2f} GiB (before the fit {rss0:.2f})")
    with tempfile.TemporaryDirectory() as tmp:
        stats.save(Path(tmp) / "stats.pt")
        file_bytes = (Path(tmp) / "stats.pt").stat().st_size
    dense_bytes = args.classes * args.dim**2 * 4
    # nll + gradient for a batch of 32 mixed labels
    g = torch.Generator().manual_seed(7)
    y32 = torch.randint(0, args.classes, (32,), generator=g)
    z32 = feats.draw(y32, torch.full((32,), 10**6)).requires_grad_()

    def step():
        v = stats.nll(z32, y32)
        return torch.autograd.grad(v.sum(), z32)[0]

    step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    # the rank cap's error, against the dense definition, for the head, a capped and an uncapped class
    n = stats.counts.double()
    root = fit.sums / n.sqrt()[:, None]
    pooled = (fit.second - root.T @ root) / (len(labels) - args.classes)
    errors = {}
    last_capped = int((counts > args.rank_cap + 1).sum()) - 1  # the smallest class past the cap, if any
    for c in sorted({0, max(last_capped, 0), args.classes // 2, args.classes - 1}):
        own = feats.draw(torch.full((int(counts[c]),), c), torch.arange(int(counts[c]))).double()
        mean = own.mean(0)
        scatter = (own - mean).T @ (own - mean)
        held = feats.draw(torch.full((16,), c), torch.arange(10**6, 10**6 + 16))
        want = dense_nll(held, mean, scatter, int(counts[c]), pooled, stats.prior_strength, stats.ridge)
        got = stats.nll(held, torch.full((16,), c)).double()
        errors[c] = {"count": int(counts[c]), "capped": bool(int(counts[c]) - 1 > args.rank_cap),
                     "relative_nll_error": float((got - want).norm() / want.norm())}
    result = {"device": device_name(torch.device("cpu")), **versions(), "commit": commit(),
              "classes": args.classes, "dim": args.dim, "samples": len(labels), "rank_cap": args.rank_cap,
              "capped_classes": stats.capped, "fit_stream_s": t_add, "fit_finish_s": t_finish,
              "feature_generation_s": t_gen, "peak_rss_gib": rss, "rss_before_fit_gib": rss0,
              "stored_tensor_bytes": stats.stored_bytes(), "stored_file_bytes": file_bytes,
              "dense_precisions_bytes": dense_bytes, "nll_grad_batch32_s": min(times),
              "nll_grad_batch32_median_s": sorted(times)[2], "rank_cap_error": errors}
    print(f"  stored: {file_bytes / 2**30:.2f} GiB file ({stats.stored_bytes() / 2**30:.2f} GiB of tensors); "
          f"dense precisions would be {dense_bytes / 2**30:.1f} GiB; {stats.capped} classes past the cap")
    print(f"  nll + gradient, batch 32: {min(times) * 1e3:.0f} ms (median {sorted(times)[2] * 1e3:.0f} ms)")
    for c, e in errors.items():
        print(f"  class {c} ({e['count']} samples{', capped' if e['capped'] else ''}): relative nll error "
              f"{e['relative_nll_error']:.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
