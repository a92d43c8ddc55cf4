"""The demos' data: scikit-learn's digits at 16x16, the long-tailed split, the colored-digits groups (colors,
their assignment, the stroke colors read back from pixels), group metrics, and image folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..train import evaluate
from .config import BETWEEN, COLORS, EMPTY, NUM_CLASSES, PALETTE, PRIORS, DemoConfig


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as [N, 1, 16, 16] in [-1, 1] (bilinear upsampling of the 8x8 originals) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(d.target)


def lt_counts(cfg: DemoConfig) -> list[int]:
    """Training images per class: head * imbalance^(-rank / (C - 1)), ranks shuffled by the seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    rank = torch.randperm(NUM_CLASSES, generator=g).tolist()
    return [max(1, round(cfg.head * cfg.imbalance ** (-r / (NUM_CLASSES - 1)))) for r in rank]


def split(x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig):
    """(test, non-test pool, long-tailed training subset of the pool) as index tensors."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    counts = lt_counts(cfg)
    test, pool, lt = [], [], []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:cfg.test_per_class])
        rest = idx[cfg.test_per_class:]
        pool.append(rest)
        lt.append(rest[:counts[c]])
    return torch.cat(test), torch.cat(pool), torch.cat(lt)


def apportion(n: int, majority_share: float, majority: int, k: int = len(COLORS)) -> list[int]:
    """Images per color among ``n``: round(n * share) of the majority color, the rest split as evenly as
    possible over the other colors, the larger parts to the colors right after the majority (mod k)."""
    counts = [0] * k
    counts[majority] = round(n * majority_share)
    rest = n - counts[majority]
    for j in range(1, k):
        counts[(majority + j) % k] = rest // (k - 1) + (j <= rest % (k - 1))
    return counts


def majority_color(labels: torch.Tensor) -> torch.Tensor:
    """The majority color of each digit in the groups setting: d mod 4."""
    return labels % len(COLORS)


def color_assignment(labels: torch.Tensor, majority_share: float, g: torch.Generator) -> torch.Tensor:
    """A color per image: within each class exactly ``apportion``'s counts, in a random order."""
    colors = torch.empty_like(labels)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        counts = apportion(len(idx), majority_share, c % len(COLORS))
        own = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
        colors[idx] = own[torch.randperm(len(own), generator=g)]
    return colors


def colorize(gray: torch.Tensor, colors: torch.Tensor, jitter: float, g: torch.Generator) -> torch.Tensor:
    """Grayscale digits [N, 1, H, W] in [-1, 1] drawn as colored strokes on black: [N, 3, H, W] in [-1, 1]
    (pixel = intensity x (palette color + uniform jitter in [-jitter, jitter] per channel, clamped))."""
    base = torch.tensor(list(PALETTE.values()))[colors]
    rgb = (base + (torch.rand(base.shape, generator=g) * 2 - 1) * jitter).clamp(0, 1)
    return ((gray + 1) / 2 * rgb[:, :, None, None]) * 2 - 1


@dataclass
class GroupData:
    """The groups setting's sets (images [N, 3, 16, 16] in [-1, 1], labels, colors as palette indices) and
    ``digits``: each set's images as indices into ``load_digits16()``."""

    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    classifier: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    generator: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    oracle: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    digits: dict[str, torch.Tensor]


def make_group_data(x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig) -> GroupData:
    """Colored digits. Test: ``test_per_class`` digits per class in every color. Classifier: the same number
    of non-test digits for every class (the smallest class's), colors at ``classifier_majority``. Generator:
    every non-test digit, colors at the prior's share. Oracle: every non-test digit in every color."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    test, pool = [], []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:cfg.test_per_class])
        pool.append(idx[cfg.test_per_class:])
    n_clf = min(len(p) for p in pool)
    clf = torch.cat([p[:n_clf] for p in pool])
    pool = torch.cat(pool)
    test = torch.cat(test)
    k = len(COLORS)

    digits = {}

    def every_color(name, idx):
        colors = torch.arange(k).repeat(len(idx))
        idx = digits[name] = idx.repeat_interleave(k)
        return colorize(x[idx], colors, cfg.color_jitter, g), y[idx], colors

    def skewed(name, idx, share):
        digits[name] = idx
        colors = color_assignment(y[idx], share, g)
        return colorize(x[idx], colors, cfg.color_jitter, g), y[idx], colors

    return GroupData(test=every_color("test", test),
                     classifier=skewed("classifier", clf, cfg.classifier_majority),
                     generator=skewed("generator", pool, PRIORS[cfg.color_prior]),
                     oracle=every_color("oracle", pool), digits=digits)


def stroke_colors(images: torch.Tensor, *, threshold: float = 0.35, margin: float = 0.25,
                  min_pixels: int = 3) -> torch.Tensor:
    """The stroke color of each RGB image [N, 3, H, W] in [-1, 1], measured from the pixels: an index into
    ``COLORS``, ``BETWEEN`` or ``EMPTY``.

    Stroke pixels: brightest channel above ``threshold`` (in [0, 1]); fewer than ``min_pixels`` of them:
    EMPTY. Their intensity-weighted mean color, scaled so that its largest channel is 1 (brightness drops
    out), goes to the nearest palette color scaled the same way, or to BETWEEN when even that one is farther
    than ``margin`` (a third of the closest two palette colors' distance, red and yellow's 0.75; with
    ``margin=float("inf")`` every stroke goes to its nearest palette color).
    """
    v = ((images.float() + 1) / 2).clamp(0, 1)
    intensity = v.amax(1)
    mask = intensity > threshold
    w = intensity * mask
    mean = (v * w[:, None]).sum((2, 3)) / w.sum((1, 2)).clamp_min(1e-12)[:, None]
    chroma = mean / mean.amax(1, keepdim=True).clamp_min(1e-12)
    pal = torch.tensor(list(PALETTE.values()))
    d = torch.cdist(chroma, pal / pal.amax(1, keepdim=True))
    dist, nearest = d.min(1)
    out = torch.where(dist > margin, torch.full_like(nearest, BETWEEN), nearest)
    return torch.where(mask.sum((1, 2)) < min_pixels, torch.full_like(out, EMPTY), out)


def color_report(labels: torch.Tensor, colors: torch.Tensor) -> dict:
    """Per class the histogram over (COLORS..., between, empty), and the shares over all samples: minority
    (a palette color other than the class's majority), between palette colors, no stroke."""
    hist = torch.zeros(NUM_CLASSES, len(COLORS) + 2, dtype=torch.long)
    hist.index_put_((labels, colors), torch.ones_like(labels), accumulate=True)
    n = max(len(labels), 1)
    minority = (colors < len(COLORS)) & (colors != majority_color(labels))
    keys = list(COLORS) + ["between", "empty"]
    return {"minority_share": minority.sum().item() / n,
            "between_share": (colors == BETWEEN).sum().item() / n,
            "empty_share": (colors == EMPTY).sum().item() / n,
            "histogram": {c: dict(zip(keys, hist[c].tolist())) for c in range(NUM_CLASSES)}}


WORST_K = 5  # worst5: the mean of the 5 worst groups (less noise than the single worst one)


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, colors: torch.Tensor) -> dict:
    """Test accuracy overall, worst group, mean of the ``WORST_K`` worst groups (``worst5``), minority and
    majority groups (a group: digit x color), per group and per class (``train.evaluate`` with the groups;
    minority: a color other than the digit's majority), and ``intervals``: their bootstrap intervals over
    the test images (``bootstrap_intervals``)."""
    k = len(COLORS)
    groups = labels * k + colors
    out = evaluate(predictions, labels, None, groups=groups)
    correct = (predictions == labels).float()
    minority = colors != majority_color(labels)
    out["minority"] = correct[minority].mean().item()
    out["majority"] = correct[~minority].mean().item()
    out["worst5"] = sum(sorted(out["per_group"].values())[:WORST_K]) / min(WORST_K, len(out["per_group"]))
    worst = out.pop("worst_group_id")
    out["worst_group_name"] = f"{worst // k} {COLORS[worst % k]}"
    out["per_group"] = {f"{g // k} {COLORS[g % k]}": a for g, a in out["per_group"].items()}
    out["intervals"] = bootstrap_intervals(correct, groups, minority)
    return out


def bootstrap_intervals(correct: torch.Tensor, groups: torch.Tensor, minority: torch.Tensor, *,
                        draws: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals (``level``) of overall, worst-group, worst5 and minority-group accuracy when the
    test images are drawn again with replacement within each group (each group keeps its size): how much
    of a metric is the luck of the test set. ``draws`` resamples from a generator seeded with ``seed``, so a
    rerun gives the same intervals. ``correct``: 1/0 per test image; ``minority``: per image, whether its
    group is a minority one."""
    gen = torch.Generator().manual_seed(seed)
    accs, sizes, minor = [], [], []
    for g in groups.unique().tolist():
        member = groups == g
        c = correct[member].double()
        accs.append(c[torch.randint(len(c), (draws, len(c)), generator=gen)].mean(1))
        sizes.append(len(c))
        minor.append(bool(minority[member][0]))
    acc, w, m = torch.stack(accs, 1), torch.tensor(sizes, dtype=torch.float64), torch.tensor(minor)
    values = {"overall": acc @ w / w.sum(), "worst_group": acc.min(1).values,
              "worst5": acc.sort(1).values[:, :WORST_K].mean(1)}
    if m.any():
        values["minority"] = acc[:, m] @ w[m] / w[m].sum()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {name: torch.quantile(v, q).tolist() for name, v in values.items()}


def group_counts(labels: torch.Tensor, colors: torch.Tensor) -> dict:
    """{digit: {color: images}} of a set."""
    return {d: {c: int(((labels == d) & (colors == k)).sum()) for k, c in enumerate(COLORS)}
            for d in range(NUM_CLASSES)}


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """One image [C, H, W] in [-1, 1] as uint8 pixels: [H, W] for one channel, [H, W, C] otherwise."""
    arr = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return arr[0].numpy() if len(arr) == 1 else arr.permute(1, 2, 0).numpy()


def images_to_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """The classifier's training set as an ImageFolder of PNGs (the production path reads exemplars there)."""
    from PIL import Image

    for k, (img, c) in enumerate(zip(x, y.tolist())):
        d = root / f"{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(img)).save(d / f"{k:05d}.png")


def read_folder(root: Path, classes: list[str], channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images written by the production path, back to [N, channels, 16, 16] in [-1, 1]."""
    from PIL import Image

    xs, ys = [], []
    for c in classes:
        for p in sorted((root / c).glob("*.png")):
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
            xs.append(torch.from_numpy(arr.reshape(*arr.shape[:2], channels)).permute(2, 0, 1))
            ys.append(int(c))
    if not xs:
        return torch.zeros(0, channels, 16, 16), torch.zeros(0, dtype=torch.long)
    return torch.stack(xs) / 127.5 - 1, torch.tensor(ys)


def tensor_ds(x: torch.Tensor, y: torch.Tensor):
    return torch.utils.data.TensorDataset(x, y)
