"""The demo generator's quality, measured before anything is compared on it, and the gate it must pass.

``measure_generator`` samples ``per_class`` unguided images per digit (fixed seeds, the demo's own sampler and
schedule, no feedback) and reads them with the oracle and the stroke-color measure:

- fidelity: the share the oracle reads as the intended digit;
- between / empty share (groups): strokes in a color between the palette's, or no stroke;
- color calibration (groups): the share of samples in their digit's majority color against the generator
  set's prior, and per palette color the samples' share against the training set's.

``denoising_error`` says why a generator misses it: the error of its x0 estimate at each noise level, against
what predicting the class's mean image would cost.

``GATE``: fidelity >= 90% (both settings) and, for groups, between share <= 15%. A demo whose generator is
below it says so in its log, its ``metrics.json`` (``generator.passes``) and its summary: its comparisons
stand on a generator that did not learn the data.
"""

from __future__ import annotations

import torch

from .config import BETWEEN, COLORS, EMPTY, NUM_CLASSES, PRIORS, DemoConfig, Variant
from .data import majority_color, stroke_colors

GATE = {"fidelity": 0.90, "between_share": 0.15}  # fidelity at least, between share at most (groups)


def measure_generator(unet, sched, oracle, cfg: DemoConfig, *, per_class: int = 30,
                      train_colors: torch.Tensor | None = None) -> dict:
    """Unguided samples of every digit, read by ``oracle``; the gate's verdict (``passes``, ``failed``)."""
    from ..train import predict
    from .sampling import label_sample_fn, variant_sampler

    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    seeds = [10_000_000 + cfg.seed * 100_000 + k for k in range(len(labels))]  # apart from the plan's
    images = []
    with torch.random.fork_rng(devices=[]):  # what runs after (classifier initialisations) is unchanged
        fn = label_sample_fn(variant_sampler(unet, sched, oracle, cfg, Variant("no feedback"), None))
        for b in range(0, len(labels), cfg.sample_batch):
            arr, _, _ = fn(None, None, labels[b:b + cfg.sample_batch].tolist(), seeds[b:b + cfg.sample_batch])
            images.append(torch.from_numpy(arr))
        u8 = torch.cat(images)
        x = (u8.permute(0, 3, 1, 2) if u8.dim() == 4 else u8[:, None]).float() / 127.5 - 1
        out = {"samples": len(labels), "fidelity": float((predict(oracle, x) == labels).float().mean())}
    if cfg.channels == 3:
        colors = stroke_colors(x)
        on_palette = colors < len(COLORS)
        majority = (colors == majority_color(labels)) & on_palette
        out |= {"between_share": float((colors == BETWEEN).float().mean()),
                "empty_share": float((colors == EMPTY).float().mean()),
                "majority_share": float(majority.sum() / on_palette.sum().clamp_min(1)),
                "prior_majority_share": PRIORS[cfg.color_prior],
                "palette_share": {c: float((colors == k).float().mean()) for k, c in enumerate(COLORS)}}
        if train_colors is not None:
            out["train_palette_share"] = {c: float((train_colors == k).float().mean())
                                          for k, c in enumerate(COLORS)}
    return out | verdict(out)


DENOISING_TIMESTEPS = (40, 200, 400, 600, 800, 950)  # of the DDPM schedule (flow: the same SNR)


def denoising_error(unet, sched, x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig, *, n: int = 256,
                    timesteps: tuple[int, ...] = DENOISING_TIMESTEPS) -> dict:
    """The mean squared error of the generator's x0 estimate (from its output, conditioned on the digit) on
    ``n`` of its training images (fixed draw), noised to each DDPM ``timesteps``' alpha-bar (a flow generator
    at the noise level of the same signal-to-noise ratio); ``class_mean_mse``: the error of the digit's mean
    image, where the best estimate goes at full noise. An estimate far above that at high noise starts DDIM
    from garbage: epsilon prediction's x0 is (x - sqrt(1 - a) eps) / sqrt(a), which multiplies the network's
    error by sqrt((1 - a) / a) (about 26 at t = 800 of the linear schedule, 97 at t = 950)."""
    from diffusers import DDIMScheduler

    from ..ops.formulas import noise_coefficients, split_prediction

    g = torch.Generator().manual_seed(0)
    i = torch.randperm(len(x), generator=g)[:n]
    x0, labels = x[i], y[i]
    means = torch.stack([x[y == c].mean(0) for c in range(NUM_CLASSES)])
    ptype = "flow" if cfg.objective == "flow" else sched.config.prediction_type
    acp = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod  # the demo's
    errors = []
    with torch.no_grad():
        for t in timesteps:
            a = acp[t]
            alpha, sigma = noise_coefficients(a, ptype, x0)
            xt = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
            step = sigma.flatten()[0] * 1000 if ptype == "flow" else torch.tensor(t)
            out = unet(xt, step.expand(len(x0)), class_labels=labels).sample
            errors.append(float(((split_prediction(out, xt, a, ptype)[0] - x0) ** 2).mean()))
    return {"timesteps": list(timesteps), "x0_mse": errors,
            "class_mean_mse": float(((means[labels] - x0) ** 2).mean())}


def verdict(m: dict) -> dict:
    """The gate on a measure: ``passes`` and the reasons it ``failed`` (empty when it passes)."""
    failed = [] if m["fidelity"] >= GATE["fidelity"] else [
        f"fidelity {m['fidelity']:.1%} < {GATE['fidelity']:.0%}"]
    if "between_share" in m and m["between_share"] > GATE["between_share"]:
        failed.append(f"between share {m['between_share']:.1%} > {GATE['between_share']:.0%}")
    return {"gate": GATE, "passes": not failed, "failed": failed}


def generator_line(m: dict) -> str:
    """One line of the generator's measure and verdict, for the log and the summary."""
    parts = [f"fidelity {m['fidelity']:.1%}"]
    if "between_share" in m:
        parts += [f"between {m['between_share']:.1%}", f"majority color {m['majority_share']:.1%} (prior "
                                                        f"{m['prior_majority_share']:.0%})"]
    said = ("passes the gate" if m["passes"] else
            f"BELOW THE GATE ({'; '.join(m['failed'])}): the comparisons stand on a generator that did not "
            "learn the data")
    return f"generator ({m['samples']} unguided samples): {', '.join(parts)}; {said}"
