"""The demos' report: tables of the synthetic samples and their colors, sample grids, accuracy bars."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import COLORS, NUM_CLASSES

GROUP_COLUMNS = ("overall", "worst_group", "minority", "majority")


def slug(name: str) -> str:
    return name.replace(" ", "-")


def samples_table(stats: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"\n{'synthetic samples':22} {'fidelity':>8} {'minority':>8} {'nearest':>7} {'in worst':>8} "
             f"{'between':>7} {'empty':>5} {'s/image':>8} {'vs none':>7}"]
    for v, s in stats.items():
        t, r = s["seconds_per_image"], s["time_vs_no_feedback"]
        lines.append(f"{v:22} {pct(s['fidelity']):>8} {pct(s['minority_share']):>8} "
                     f"{pct(s['nearest']['minority_share']):>7} {pct(s['worst_color_share']):>8} "
                     f"{pct(s['between_share']):>7} {pct(s['empty_share']):>5} {t:8.4f} {r:6.2f}x")
    lines.append("(%: fidelity = the oracle reads the intended digit; minority = stroke in a non-majority "
                 "palette color (nearest: by the nearest palette color, none counted between); in worst = in "
                 "the color the real-only classifier reads worst for that digit; between palette colors; "
                 "empty = no stroke; s/image: fastest of timing_repeats interleaved runs of one batch per "
                 "variant)")
    return "\n".join(lines)


def color_table(stats: dict) -> str:
    """Per digit and variant: the samples' nearest palette colors, the digit's majority color first."""
    names = list(stats)
    head = "".join(f" {n[:16]:>16}" for n in names)
    lines = [f"\nnearest palette color of the strokes per digit: majority | {'/'.join(c[0] for c in COLORS)} "
             "of the rest | empty",
             f"{'digit':6}{head}"]
    for d in range(NUM_CLASSES):
        cells = []
        for n in names:
            h = stats[n]["nearest"]["histogram"][d]
            maj = COLORS[d % len(COLORS)]
            rest = "/".join("." if c == maj else str(h[c]) for c in COLORS)
            cells.append(f" {h[maj]:>3} | {rest} | {h['empty']}")
        lines.append(f"{d} {COLORS[d % len(COLORS)][0]:<4}" + "".join(f" {c:>16}" for c in cells))
    return "\n".join(lines)


def write_grid(out: Path, samples: dict, per_class: int = 10) -> None:
    """samples-<variant>.png: one row per class, ``per_class`` samples each, 4x enlarged, in color."""
    from torchvision.utils import save_image

    for variant, (xs, ys) in samples.items():
        tiles = []
        for c in range(NUM_CLASSES):
            own = xs[ys == c][:per_class]
            pad = torch.full((per_class - len(own), *xs.shape[1:]), -1.0)
            tiles.append(torch.cat([own, pad]))
        grid = torch.cat(tiles) / 2 + 0.5
        grid = F.interpolate(grid, scale_factor=4, mode="nearest")
        save_image(grid, str(out / f"samples-{slug(variant)}.png"), nrow=per_class, padding=2, pad_value=0.5)


def write_bars(path: Path, results: dict, groups=("overall", "many", "medium", "few")) -> None:
    """accuracy.png: grouped bars (one group per metric in ``groups``) per variant (``charts``:
    matplotlib)."""
    from .charts import accuracy_bars

    accuracy_bars(path, results, groups)
