"""The demo ``make demo`` runs: a short feedback-guided sampling run with tiny RANDOM models.

Until the embedded digits demo lands, this shows the engine end to end with no weights at all: the same
seeds sampled without and with feedback, saved as one PNG grid, and the criterion of each row printed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .conditioning import Conditioning
from .models import tiny_models
from .sampler import FeedbackGuidedSampler, SamplerConfig

RANDOM_NOTE = "NOTE: the UNet, VAE and classifier have RANDOM weights: the images are noise-like patterns."


def random_demo(out_dir: str | Path = "demo_out", *, per_row: int = 8, steps: int = 20,
                criterion: str = "entropy", feedback_scale: float = 0.05, seed: int = 0,
                progress: bool = True) -> dict:
    """Sample ``per_row`` images without and with feedback; write ``grid.png``; return row statistics."""
    from torchvision.utils import save_image

    print(RANDOM_NOTE)
    m = tiny_models(num_classes=10, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(per_row, 5, m.text_dim, generator=g)
    cond = Conditioning(pe, torch.zeros_like(pe))
    labels, seeds = [k % 10 for k in range(per_row)], [seed * 1000 + k for k in range(per_row)]
    rows, stats = [], {}
    for name, scale in (("no feedback", 0.0), (f"{criterion} feedback {feedback_scale}", feedback_scale)):
        cfg = SamplerConfig.faithful(num_inference_steps=steps, criterion=criterion, feedback_scale=scale,
                                     feedback_every=1)
        out = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg).sample(
            cond, labels, seeds, progress=progress)
        rows.append(out.images)
        stats[name] = {"mean_criterion": float(out.criterion.mean()), "nan": int(out.nan.sum())}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "grid.png"
    save_image(torch.cat(rows), str(path), nrow=per_row, padding=1)
    for name, s in stats.items():
        print(f"{name:28s} mean {criterion} of the final images: {s['mean_criterion']:.4f}  NaN samples: "
              f"{s['nan']}")
    print(f"wrote {path} (top row: no feedback; bottom row: feedback; same seeds)")
    print(RANDOM_NOTE)
    return {"grid": str(path), **stats}
