"""The embedded end-to-end demos (``fgds demo``, ``make demo``), on scikit-learn's digits (no downloads).

Two settings share one machinery: a pixel-space class-conditional diffusion model (diffusers UNet2DModel, a
null class for classifier-free guidance) trained on *all* non-test digits, a small CNN trained on a biased
subset, the synthetic budget planned and generated through the production path (``plan.make_plan``,
``production.generate_dataset``) once per variant with the same jobs and seeds, and one classifier retrained
per variant on real + synthetic (50/50 batches, Balanced Softmax with the prior those batches have).
Everything trained or generated is cached in OUT/cache.

``long-tail`` (the default): does feedback help the few-shot classes? Digits upsampled to 16x16 ([-1, 1]),
a balanced test set (50 per class), a long-tailed classifier set (exponential profile, imbalance 60: 120
images of the head class, 2 of the tail; which digit is rare depends on the seed). Each class is filled to
the head's count; variants: no feedback, loss, entropy, hardness. Accuracy per shot group.

``groups`` (the paper's NICO++ setting: classes balanced, contexts imbalanced): does feedback find the groups
the classifier gets wrong? Each digit is drawn as a colored stroke on a dark background in one of four
colors (``PALETTE``, a little per-image jitter); a group is (digit, color). The test set holds 50 digits per
class, each in all four colors (50 images per group). The classifier's set is balanced over classes (the
same count for every digit) with color spuriously tied to the class: digit d has its majority color d mod 4
for 90% of its images, the other three share the rest. The generator is conditioned on the digit only, with
an EMA of its weights, and sees all non-test digits with a color prior that is either **matched** (the same
90% skew) or **milder** (55% majority, 15% each other color). An oracle trained on every non-test digit in
all four colors measures fidelity. 60 synthetic images per class; variants: no feedback, loss, entropy,
hardness, entropy through x0 only (no UNet backward), and optionally entropy at other scales (the scale
curve). Reported: average, worst-group and minority-group accuracy; fidelity; the stroke colors of the
samples measured from the pixels (``stroke_colors``); seconds per synthetic image against no feedback.

The package: ``config`` (settings, variants, ``DemoConfig``), ``data`` (digits, splits, colored groups,
metrics), ``models`` (the generator, the small CNN, the cache), ``sampling`` (the engine for a variant, the
production loop's call over it, the samples' cache key), ``gate`` (the generator's fidelity gate, measured
before every run), ``runner`` (one runner both settings share) and ``report`` (tables, grids, bars).
"""

from .config import BETWEEN, COLORS, EMPTY, NUM_CLASSES, PALETTE, PRIORS, SETTINGS, DemoConfig, Variant
from .data import (
    GroupData,
    apportion,
    color_assignment,
    color_report,
    colorize,
    group_metrics,
    load_digits16,
    lt_counts,
    majority_color,
    make_group_data,
    split,
    stroke_colors,
)
from .models import Cache, SmallCNN, make_generator, train_generator
from .runner import run_demo

__all__ = [
    "BETWEEN", "COLORS", "EMPTY", "NUM_CLASSES", "PALETTE", "PRIORS", "SETTINGS", "Cache", "DemoConfig",
    "GroupData", "SmallCNN", "Variant", "apportion", "color_assignment", "color_report", "colorize",
    "group_metrics", "load_digits16", "lt_counts", "majority_color", "make_generator", "make_group_data",
    "run_demo", "split", "stroke_colors", "train_generator",
]
