"""What the benchmarks measure the engine against, and the inputs they feed it: the eager step sequence of a
diffusers loop with feedback (the competitor of the fused step) and photo-like images (the write path's)."""

from __future__ import annotations

import numpy as np
import torch


def eager_step(sched, t: int, eps_u, eps_c, x, grad, *, w: float, scale: float):
    """The unfused sequence of a diffusers loop with feedback (the demo code's order), batched: CFG, the
    normalised shift, then the ``DDIMScheduler``'s own step."""
    eps = eps_u + w * (eps_c - eps_u)
    if grad is not None:
        b = x.shape[0]
        gn = torch.linalg.vector_norm(grad.float().reshape(b, -1), dim=1)
        xn = torch.linalg.vector_norm(x.float().reshape(b, -1), dim=1)
        x = x + grad * (xn / (gn + 1e-8) * scale).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    out = sched.step(eps, t, x)
    return out.prev_sample, out.pred_original_sample


def smooth_image(size: int, seed: int) -> np.ndarray:
    """A smooth photo-like HxWx3 uint8 image (low-frequency color waves, mild noise): what a diffusion
    model's samples compress like, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    waves = [127 + 60 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y))
             + 40 * np.cos(2 * np.pi * rng.uniform(1, 4) * x * y) for _ in range(3)]
    return (np.stack(waves, -1) + rng.normal(0, 3, (size, size, 3))).clip(0, 255).astype(np.uint8)
