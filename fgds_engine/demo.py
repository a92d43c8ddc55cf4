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
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .criteria import get_criterion
from .data import InputError, progress_bar
from .train import TrainConfig, evaluate, format_table, predict, shot_groups, train_classifier

SETTINGS = ("long-tail", "groups")
NUM_CLASSES = 10
# the stroke colors of the groups setting (RGB in [0, 1]); digit d's majority color is d mod 4
PALETTE = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.15), "blue": (0.15, 0.35, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
COLORS = tuple(PALETTE)
BETWEEN, EMPTY = len(COLORS), len(COLORS) + 1  # stroke_colors' codes beyond the palette
PRIORS = {"matched": 0.9, "milder": 0.55}  # the generator's majority-color share in the groups setting


@dataclass(frozen=True)
class Variant:
    """A synthesis variant: no feedback (criterion None) or a criterion at a scale through a gradient path."""

    name: str
    criterion: str | None = None
    scale: float = 0.0
    grad_path: str = "full"
    scheduler: str | None = None  # None: the generator's DDIM; else a solvers.SCHEDULERS name
    steps: int | None = None  # None: the config's sample_steps
    feedback_mode: str = "auto"
    # the coverage terms (SamplerConfig's fields of the same names); None / 0: the config's CFG, off
    guidance_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cads: tuple[float, float] | None = None
    repulsion_scale: float = 0.0

    def key(self) -> dict:
        """What a cached result of this variant depends on: its fields, the coverage ones only where set
        (the keys of the variants that predate them stay the same)."""
        d = asdict(self)
        for k in ("guidance_scale", "cfg_interval", "cads", "repulsion_scale"):
            if not d[k]:
                d.pop(k)
        return d


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs. Defaults: the long-tail setting, measured on a 2-core CPU to finish in about 2
    minutes cold; ``DemoConfig.groups()`` gives the groups setting's (fixed before any feedback run)."""

    seed: int = 0
    test_per_class: int = 50
    head: int = 120  # training images of the most frequent class
    imbalance: float = 60.0  # head / tail
    gen_channels: tuple[int, ...] = (16, 32, 32)
    gen_steps: int = 800
    gen_batch: int = 64
    gen_lr: float = 2e-3
    label_dropout: float = 0.1
    sample_steps: int = 25
    guidance_scale: float = 1.5
    feedback_scale: float = 0.03
    feedback_every: int = 5
    sample_batch: int = 128
    clf_epochs: int = 30
    oracle_epochs: int = 30
    budget_cap: int | None = None  # at most this many synthetic images per class (None: fill to the head)
    threads: int = 2  # torch CPU threads while the demo runs: float reductions depend on it
    # the groups setting
    setting: str = "long-tail"
    color_prior: str = "matched"  # the generator's color prior: matched (90% majority) | milder (55%)
    classifier_majority: float = 0.9  # majority-color share of the classifier's training set
    color_jitter: float = 0.08  # per-image uniform jitter of each RGB channel of the stroke color
    synthetic_per_class: int = 60
    ema_decay: float | None = None  # the generator's weights: an EMA (diffusers EMAModel) at this decay
    scales: tuple[float, ...] = ()  # further entropy feedback scales (the scale curve)
    # the scheduler grid: (scheduler name, steps) pairs, each unguided and with entropy feedback, in place of
    # the criteria variants (benchmarks/bench_demo_schedulers.py)
    solvers: tuple[tuple[str, int], ...] = ()
    # the coverage grid (benchmarks/bench_demo_coverage.py; README "Coverage beyond the prior") in place of
    # the criteria variants
    coverage: bool = False

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise InputError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.color_prior not in PRIORS:
            raise InputError(f"color prior must be one of {', '.join(PRIORS)}, got {self.color_prior!r}")

    @classmethod
    def quick(cls, seed: int = 0, setting: str = "long-tail", **kw) -> DemoConfig:
        """A minute-long run for tests and CI: every stage, tiny budgets (numbers mean nothing)."""
        if setting == "groups":
            return cls.groups(seed, gen_steps=40, sample_steps=6, feedback_every=2, clf_epochs=3,
                              oracle_epochs=2, synthetic_per_class=6, sample_batch=64, **kw)
        return cls(seed=seed, gen_steps=40, sample_steps=6, feedback_every=2, clf_epochs=3, oracle_epochs=3,
                   budget_cap=6, sample_batch=64, **kw)

    @classmethod
    def groups(cls, seed: int = 0, prior: str = "matched", **kw) -> DemoConfig:
        """The groups setting: 3x the long-tail generator's steps (a 3-channel prior needs them) with an EMA,
        60 synthetic images per class, the paper's feedback (0.03 every 5th of 25 steps, CFG 1.5)."""
        return cls(**{"seed": seed, "setting": "groups", "color_prior": prior, "gen_steps": 2400,
                      "ema_decay": 0.999, "oracle_epochs": 15} | kw)

    @property
    def channels(self) -> int:
        return 3 if self.setting == "groups" else 1

    def variants(self) -> list[Variant]:
        """The synthesis variants of this setting, in the order they run."""
        if self.solvers:
            return self.solver_variants()
        if self.coverage:
            return self.coverage_variants()
        base = [Variant("no feedback")] + [Variant(c, c, self.feedback_scale)
                                           for c in ("loss", "entropy", "hardness")]
        if self.setting == "long-tail":
            return base
        return base + [Variant("entropy x0", "entropy", self.feedback_scale, "x0")] + [
            Variant(f"entropy {s:g}", "entropy", s) for s in self.scales if s != self.feedback_scale]


    def solver_variants(self) -> list[Variant]:
        """DDIM at ``sample_steps`` unguided, with entropy feedback (auto form: shift) and in the score form;
        then per (scheduler, steps) of ``solvers`` unguided and with entropy feedback at the same scale
        (feedback steps: see ``feedback_every_for``)."""
        e = self.feedback_scale
        out = [Variant("no feedback"), Variant("entropy", "entropy", e),
               Variant("entropy score", "entropy", e, feedback_mode="score")]
        for name, steps in self.solvers:
            out += [Variant(f"{name} {steps}", scheduler=name, steps=steps),
                    Variant(f"{name} {steps} entropy", "entropy", e, scheduler=name, steps=steps)]
        return out

    def coverage_variants(self) -> list[Variant]:
        """The grid fixed before any result (README): CFG 1.5 (the config's), 1.0 and 3.0, interval CFG 1.5
        and 3.0 at the published (0.28, 5.42], CADS at its published defaults, particle repulsion at
        feedback's per-step push on feedback's steps; each unguided and with entropy feedback."""
        e, interval = self.feedback_scale, (0.28, 5.42)
        terms = [("cfg 1.0", dict(guidance_scale=1.0)), ("cfg 3.0", dict(guidance_scale=3.0)),
                 ("interval 1.5", dict(cfg_interval=interval)),
                 ("interval 3.0", dict(guidance_scale=3.0, cfg_interval=interval)),
                 ("cads", dict(cads=(0.6, 0.9))), ("repulsion", dict(repulsion_scale=e))]
        out = [Variant("no feedback"), Variant("entropy", "entropy", e)]
        for name, kw in terms:
            out += [Variant(name, **kw), Variant(f"{name} entropy", "entropy", e, **kw)]
        return out

    def feedback_every_for(self, steps: int) -> int:
        """The rule fixed before any scheduler result: a shorter schedule keeps the number of feedback steps
        (sample_steps / feedback_every, 5 of 25), spread over the whole schedule from the first step: every
        (steps * feedback_every / sample_steps)-th step (10 steps: every 2nd, 15: 3rd, 20: 4th)."""
        return max(1, round(steps * self.feedback_every / self.sample_steps))


# ----------------------------------------------------------------------------------------------- data


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


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, colors: torch.Tensor) -> dict:
    """Test accuracy overall, worst group, minority and majority groups (a group: digit x color), per group
    and per class (``train.evaluate`` with the groups; minority: a color other than the digit's majority)."""
    k = len(COLORS)
    out = evaluate(predictions, labels, None, groups=labels * k + colors)
    correct = (predictions == labels).float()
    minority = colors != majority_color(labels)
    out["minority"] = correct[minority].mean().item()
    out["majority"] = correct[~minority].mean().item()
    worst = out.pop("worst_group_id")
    out["worst_group_name"] = f"{worst // k} {COLORS[worst % k]}"
    out["per_group"] = {f"{g // k} {COLORS[g % k]}": a for g, a in out["per_group"].items()}
    return out


class SmallCNN(nn.Sequential):
    """The demo's classifier: three conv blocks and a linear head (its input: the penultimate features)."""

    def __init__(self, num_classes: int = NUM_CLASSES, channels: int = 1):
        super().__init__(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, num_classes))


# ----------------------------------------------------------------------------------------------- caching


class Cache:
    """Files under OUT/cache named by what produced them (a hash of the config fields they depend on)."""

    def __init__(self, folder: Path, log):
        self.folder, self.log = folder, log
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, key: dict) -> Path:
        h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.folder / f"{name}-{h}.pt"

    def model(self, name: str, key: dict, build, train) -> nn.Module:
        """The cached weights of ``build()`` if present, else ``train(model)`` and store them."""
        p = self.path(name, key)
        model = build()
        if p.exists():
            model.load_state_dict(torch.load(p, weights_only=True))
            self.log(f"  {name}: cached ({p.name})")
        else:
            t0 = time.perf_counter()
            train(model)
            torch.save(model.state_dict(), p)
            self.log(f"  {name}: trained in {time.perf_counter() - t0:.0f} s")
        return model.eval()


# ----------------------------------------------------------------------------------------------- generator


def make_generator(cfg: DemoConfig):
    """Class-conditional pixel-space UNet2DModel with ``cfg.channels`` channels (class NUM_CLASSES is the null
    class) and its scheduler."""
    from diffusers import DDIMScheduler, UNet2DModel

    levels = len(cfg.gen_channels)
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(sample_size=16, in_channels=cfg.channels, out_channels=cfg.channels,
                       block_out_channels=cfg.gen_channels, layers_per_block=1, down_block_types=down,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                       num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          timestep_spacing="trailing", set_alpha_to_one=True)
    return unet, sched


def train_generator(unet, sched, x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig, progress: bool) -> None:
    """DDPM epsilon-prediction training with label dropout to the null class (for CFG); with
    ``cfg.ema_decay`` the model ends with the EMA of its weights (diffusers ``EMAModel``, warm-up on)."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.gen_lr, weight_decay=0.0)
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    acp = sched.alphas_cumprod
    unet.train()
    steps = progress_bar(range(cfg.gen_steps), progress, desc="  training the generator", unit="step",
                         leave=False)
    for _ in steps:
        i = torch.randint(0, len(x), (cfg.gen_batch,), generator=g)
        x0, c = x[i], y[i].clone()
        c[torch.rand(len(c), generator=g) < cfg.label_dropout] = NUM_CLASSES
        t = torch.randint(0, 1000, (len(i),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        if ema is not None:
            ema.step(unet.parameters())
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()


# ----------------------------------------------------------------------------------------------- demo


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """One image [C, H, W] in [-1, 1] as uint8 pixels: [H, W] for one channel, [H, W, C] otherwise."""
    arr = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return arr[0].numpy() if len(arr) == 1 else arr.permute(1, 2, 0).numpy()


def _images_to_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """The classifier's training set as an ImageFolder of PNGs (the production path reads exemplars there)."""
    from PIL import Image

    for k, (img, c) in enumerate(zip(x, y.tolist())):
        d = root / f"{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_uint8(img)).save(d / f"{k:05d}.png")


def _read_folder(root: Path, classes: list[str], channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
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


def _entropy(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = model(x).softmax(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def run_demo(out: str | Path = "demo_out", *, config: DemoConfig | None = None, progress: bool = True,
             log=print) -> dict:
    """Run one setting's demo; print its tables; write metrics.json, samples-*.png and accuracy.png to OUT."""

    cfg = config or DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the same numbers whatever the machine's core count
    try:
        run = _run_groups if cfg.setting == "groups" else _run_long_tail
        return run(Path(out), cfg, progress, log)
    finally:
        torch.set_num_threads(threads)


def _slug(name: str) -> str:
    return name.replace(" ", "-")


def _sample_key(cfg: DemoConfig) -> dict:
    """What the samples of a variant depend on, besides the variant (the list of variants run is not)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("scales", "threads", "solvers", "coverage")}


def _synthesize(cache: Cache, cfg: DemoConfig, plan, classes: list[str], variant: Variant,
                sampler) -> tuple[torch.Tensor, torch.Tensor, int, dict | None]:
    """One variant's synthetic images through the production path (cached per variant): (images, labels,
    images generated now, {"seconds", "images"} of the generation when it ran whole, else None)."""
    from .plan import write_plan
    from .production import GenerateOptions, generate_dataset

    folder = cache.folder / f"synthetic-{_slug(variant.name)}-{cache.path('s', _sample_key(cfg)).stem}"
    write_plan(plan, folder)
    t0 = time.perf_counter()
    report = generate_dataset(plan, folder, _sample_fn(sampler), GenerateOptions(batch_size=cfg.sample_batch),
                              {"variant": variant.name}, progress=False)
    seconds = time.perf_counter() - t0
    timing = folder / "timing.json"
    if report.generated == len(plan.jobs) and report.generated:
        timing.write_text(json.dumps({"seconds": seconds, "images": report.generated}) + "\n")
    xs, ys = _read_folder(folder, classes, cfg.channels)
    return xs, ys, report.generated, json.loads(timing.read_text()) if timing.exists() else None


def _run_long_tail(out: Path, cfg: DemoConfig, progress: bool, log) -> dict:
    from .data import scan_imagefolder
    from .plan import PlanOptions, make_plan

    cache = Cache(out / "cache", log)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    x, y = load_digits16()
    test, pool, lt = split(x, y, cfg)
    counts = torch.bincount(y[lt], minlength=NUM_CLASSES).tolist()
    groups = shot_groups(counts)
    log(f"digits 16x16: {len(test)} test (balanced), {len(pool)} non-test; long-tailed classifier set "
        f"{len(lt)} images, per class {counts} (many: {groups['many']}, medium: {groups['medium']}, "
        f"few: {groups['few']})")
    data_key = {"seed": cfg.seed, "head": cfg.head, "imbalance": cfg.imbalance, "test": cfg.test_per_class}
    clf_cfg = TrainConfig(epochs=cfg.clf_epochs, seed=cfg.seed)

    log("models (pixel-space diffusion on ALL non-test digits; classifiers on the long-tailed set):")
    unet, sched = make_generator(cfg)
    gen_key = data_key | {k: getattr(cfg, k) for k in ("gen_channels", "gen_steps", "gen_batch", "gen_lr",
                                                         "label_dropout")}
    unet = cache.model("generator", gen_key, lambda: unet,
                       lambda m: train_generator(m, sched, x[pool], y[pool], cfg, progress))
    oracle_cfg = replace(clf_cfg, epochs=cfg.oracle_epochs, balanced_softmax=False)
    oracle = cache.model("oracle", data_key | {"epochs": cfg.oracle_epochs}, SmallCNN,
                         lambda m: train_classifier(m, _tensor_ds(x[pool], y[pool]), y[pool].tolist(),
                                                    config=oracle_cfg))
    baseline = cache.model("baseline", data_key | asdict(clf_cfg), SmallCNN, lambda m: train_classifier(
        m, _tensor_ds(x[lt], y[lt]), y[lt].tolist(), config=clf_cfg, num_classes=NUM_CLASSES))
    results = {"real only": evaluate(predict(baseline, x[test]), y[test], counts)}

    real_dir = out / "cache" / f"lt-real-{cache.path('lt', data_key).stem}"
    if not real_dir.exists():
        _images_to_folder(real_dir, x[lt], y[lt])
    scan = scan_imagefolder(real_dir, verify=False)
    plan = make_plan(scan, PlanOptions(run_seed=cfg.seed, min_per_class=0))
    if cfg.budget_cap is not None:
        plan.jobs = [j for j in plan.jobs if int(j.job_id.split("_")[1]) < cfg.budget_cap]
    stats = _class_stats(baseline, x[lt], y[lt])
    log(f"synthetic budget: {len(plan.jobs)} images (the same jobs and seeds for every variant)")
    samples, sample_stats, samplers = {}, {}, {}
    for variant in cfg.variants():
        t0 = time.perf_counter()
        samplers[variant.name] = sampler = _sampler(unet, sched, baseline, cfg, variant, stats)
        xs, ys, generated, _ = _synthesize(cache, cfg, plan, scan.classes, variant, sampler)
        samples[variant.name] = (xs, ys)
        fidelity = float((predict(oracle, xs) == ys).float().mean()) if len(xs) else float("nan")
        sample_stats[variant.name] = {"mean_entropy": _entropy(baseline, xs) if len(xs) else float("nan"),
                                      "fidelity": fidelity, "generated_now": generated}
        clf_key = data_key | asdict(clf_cfg) | {"variant": variant.name, "gen": gen_key,
                                                "samples": _sample_key(cfg)}
        model = cache.model(f"classifier-{_slug(variant.name)}", clf_key, SmallCNN,
                            lambda m, xs=xs, ys=ys: train_classifier(
                                m, _tensor_ds(x[lt], y[lt]), y[lt].tolist(), _tensor_ds(xs, ys), ys.tolist(),
                                config=clf_cfg, num_classes=NUM_CLASSES))
        results[variant.name] = evaluate(predict(model, x[test]), y[test], counts)
        log(f"  {variant.name}: {generated} generated now, fidelity {fidelity:.1%}, "
            f"{time.perf_counter() - t0:.0f} s")
    per_image = _time_variants(samplers, plan, cfg)
    for name, st in sample_stats.items():
        st["seconds_per_image"] = per_image[name]
        st["time_vs_no_feedback"] = per_image[name] / per_image["no feedback"]
    table = format_table(results)
    log("\ntest accuracy (%), balanced test set; groups by training images: many > 100, medium 20-100, "
        "few < 20")
    log(table)
    log(f"\n{'synthetic samples':22} {'entropy':>8} {'fidelity':>9}")
    for v, s in sample_stats.items():
        log(f"{v:22} {s['mean_entropy']:8.3f} {s['fidelity']:9.1%}")
    _write_grid(out, samples)
    _write_bars(out / "accuracy.png", results)
    metrics = {"config": asdict(cfg), "train_counts": counts, "groups": groups, "accuracy": results,
               "samples": sample_stats, "seconds": time.perf_counter() - t_start}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"\nwrote {out / 'metrics.json'}, {out / 'accuracy.png'} and samples-<variant>.png "
        f"({metrics['seconds']:.0f} s)")
    return metrics


GROUP_COLUMNS = ("overall", "worst_group", "minority", "majority")


def _seeded(seed: int, build):
    """``build()`` with torch's global generator seeded first (model initialisation independent of what ran
    before, cached or not)."""
    torch.manual_seed(seed)
    return build()


def _run_groups(out: Path, cfg: DemoConfig, progress: bool, log) -> dict:
    from .data import scan_imagefolder
    from .plan import PlanOptions, make_plan

    cache = Cache(out / "cache", log)
    t_start = time.perf_counter()
    x, y = load_digits16()
    data = make_group_data(x, y, cfg)
    xt, yt, ct = data.test
    xc, yc, cc = data.classifier
    xg, yg, cg = data.generator
    minority_train = (cc != majority_color(yc)).sum().item()
    log(f"colored digits 16x16 ({', '.join(COLORS)}; digit d's majority color: {COLORS[0]} for 0, 4, 8, "
        f"{COLORS[1]} for 1, 5, 9, ...): test {len(xt)} images (50 digits per class x 4 colors: "
        f"{cfg.test_per_class} per group); classifier set {len(xc)} ({len(xc) // NUM_CLASSES} per class, "
        f"{len(xc) - minority_train} in majority groups, {minority_train} in minority ones); generator set "
        f"{len(xg)} (color prior {cfg.color_prior}: {PRIORS[cfg.color_prior]:.0%} majority)")
    data_key = {"setting": "groups", "seed": cfg.seed, "test": cfg.test_per_class,
                "majority": cfg.classifier_majority, "jitter": cfg.color_jitter}
    clf_cfg = TrainConfig(epochs=cfg.clf_epochs, seed=cfg.seed)
    build = lambda: _seeded(cfg.seed, lambda: SmallCNN(channels=3))  # noqa: E731

    log("models (pixel-space diffusion on ALL non-test digits, conditioned on the digit only; classifiers "
        "on the color-skewed set):")
    unet, sched = make_generator(cfg)
    gen_key = data_key | {"prior": cfg.color_prior} | {
        k: getattr(cfg, k) for k in ("gen_channels", "gen_steps", "gen_batch", "gen_lr", "label_dropout",
                                     "ema_decay")}
    unet = cache.model("generator-groups", gen_key, lambda: unet,
                       lambda m: train_generator(m, sched, xg, yg, cfg, progress))
    xo, yo, _ = data.oracle
    oracle_cfg = replace(clf_cfg, epochs=cfg.oracle_epochs, balanced_softmax=False)
    oracle = cache.model("oracle-groups", data_key | {"epochs": cfg.oracle_epochs}, build,
                         lambda m: train_classifier(m, _tensor_ds(xo, yo), yo.tolist(), config=oracle_cfg))
    baseline = cache.model("baseline-groups", data_key | asdict(clf_cfg), build, lambda m: train_classifier(
        m, _tensor_ds(xc, yc), yc.tolist(), config=clf_cfg, num_classes=NUM_CLASSES))
    results = {"real only": group_metrics(predict(baseline, xt), yt, ct)}
    # the color the real-only classifier reads worst, per digit: where feedback should send samples
    worst_color = torch.tensor([min(range(len(COLORS)), key=lambda k, d=d: (
        results["real only"]["per_group"][f"{d} {COLORS[k]}"], k)) for d in range(NUM_CLASSES)])

    real_dir = cache.folder / f"groups-real-{cache.path('groups', data_key).stem}"
    if not real_dir.exists():
        _images_to_folder(real_dir, xc, yc)
    scan = scan_imagefolder(real_dir, verify=False)
    plan = make_plan(scan, PlanOptions(run_seed=cfg.seed, min_per_class=cfg.synthetic_per_class))
    stats = _class_stats(baseline, xc, yc)
    log(f"synthetic budget: {len(plan.jobs)} images, {cfg.synthetic_per_class} per class (the same jobs and "
        f"seeds for every variant)")
    samples, sample_stats, samplers = {}, {}, {}
    bar = progress_bar(cfg.variants(), progress, desc="  variants", unit="variant", leave=False)
    for variant in bar:
        t0 = time.perf_counter()
        samplers[variant.name] = sampler = _sampler(unet, sched, baseline, cfg, variant, stats)
        xs, ys, generated, timing = _synthesize(cache, cfg, plan, scan.classes, variant, sampler)
        samples[variant.name] = (xs, ys)
        colors, nearest = stroke_colors(xs), stroke_colors(xs, margin=float("inf"))
        fidelity = float((predict(oracle, xs) == ys).float().mean()) if len(xs) else float("nan")
        in_worst = (colors == worst_color[ys]).float().mean().item() if len(xs) else float("nan")
        sample_stats[variant.name] = {
            "criterion": variant.criterion, "scale": variant.scale, "grad_path": variant.grad_path,
            "fidelity": fidelity, "mean_entropy": _entropy(baseline, xs) if len(xs) else float("nan"),
            **color_report(ys, colors), "worst_color_share": in_worst,
            "nearest": color_report(ys, nearest), "generated_now": generated,
            "generation_seconds_per_image": timing["seconds"] / timing["images"] if timing else None}
        clf_key = data_key | asdict(clf_cfg) | {"variant": variant.key(), "gen": gen_key,
                                                "samples": _sample_key(cfg)}
        model = cache.model(f"classifier-groups-{_slug(variant.name)}", clf_key, build,
                            lambda m, xs=xs, ys=ys: train_classifier(
                                m, _tensor_ds(xc, yc), yc.tolist(), _tensor_ds(xs, ys), ys.tolist(),
                                config=clf_cfg, num_classes=NUM_CLASSES))
        results[variant.name] = group_metrics(predict(model, xt), yt, ct)
        log(f"  {variant.name}: {generated} generated now, fidelity {fidelity:.1%}, "
            f"{time.perf_counter() - t0:.0f} s")
    per_image = _time_variants(samplers, plan, cfg)
    for name, s in sample_stats.items():
        s["seconds_per_image"] = per_image[name]
        s["time_vs_no_feedback"] = per_image[name] / per_image["no feedback"]
    log(f"\ntest accuracy (%), balanced test set ({cfg.test_per_class} images per group = digit x color); "
        f"worst of the {NUM_CLASSES * len(COLORS)} groups; minority: the 3 colors that are not the digit's "
        f"majority")
    log(format_table(results, GROUP_COLUMNS, ("overall", "worst group", "minority", "majority")))
    log(_samples_table(sample_stats))
    log(_color_table(sample_stats))
    _write_grid(out, samples)
    _write_bars(out / "accuracy.png", results, GROUP_COLUMNS)
    metrics = {"config": asdict(cfg), "setting": "groups", "palette": PALETTE,
               "train_groups": _group_counts(yc, cc), "generator_groups": _group_counts(yg, cg),
               "real_only_worst_color": [COLORS[k] for k in worst_color.tolist()], "accuracy": results,
               "samples": sample_stats, "seconds": time.perf_counter() - t_start}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"\nwrote {out / 'metrics.json'}, {out / 'accuracy.png'} and samples-<variant>.png "
        f"({metrics['seconds']:.0f} s)")
    return metrics


def _time_variants(samplers: dict, plan, cfg: DemoConfig, repeats: int = 3) -> dict[str, float]:
    """Seconds per image of each variant's sampler on the plan's first batch of jobs (the production call,
    PNG encoding aside), timed in alternation after a warm-up, the fastest of ``repeats`` rounds: every
    variant then sees the same machine state, whichever ran first or was cached."""
    jobs = plan.jobs[:cfg.sample_batch]
    labels, seeds = [j.class_index for j in jobs], [j.seed for j in jobs]
    fns = {name: _sample_fn(s) for name, s in samplers.items()}
    for fn in fns.values():
        fn(None, None, labels[:4], seeds[:4])
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(None, None, labels, seeds)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t / len(jobs) for name, t in best.items()}


def _group_counts(labels: torch.Tensor, colors: torch.Tensor) -> dict:
    """{digit: {color: images}} of a set."""
    return {d: {c: int(((labels == d) & (colors == k)).sum()) for k, c in enumerate(COLORS)}
            for d in range(NUM_CLASSES)}


def _samples_table(stats: dict) -> str:
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
                 "empty = no stroke; s/image: fastest of 3 interleaved runs of one batch per variant)")
    return "\n".join(lines)


def _color_table(stats: dict) -> str:
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


def _class_stats(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The hardness criterion's class Gaussians on the classifier's penultimate features of (x, y). A plain
    loop, not ``train.extract_features``: its DataLoader draws from torch's global generator, which would
    change the initialisation of the long-tail demo's classifiers trained after it."""
    from .criteria import GaussianClassStats
    from .models import Classifier

    with torch.no_grad():
        feats = torch.cat([Classifier(classifier)(x[i:i + 256], with_features=True)[1]
                           for i in range(0, len(x), 256)])
    return GaussianClassStats.fit(feats, y, NUM_CLASSES)


def _tensor_ds(x: torch.Tensor, y: torch.Tensor):
    return torch.utils.data.TensorDataset(x, y)


def _sampler(unet, sched, classifier, cfg: DemoConfig, variant: Variant, stats):
    """The engine for one variant: CFG on the null class, feedback from the biased real-only classifier."""
    from .sampler import FeedbackGuidedSampler, SamplerConfig

    feedback = variant.criterion is not None
    steps = variant.steps or cfg.sample_steps
    w = cfg.guidance_scale if variant.guidance_scale is None else variant.guidance_scale
    sc = SamplerConfig(num_inference_steps=steps, scheduler=variant.scheduler, guidance_scale=w,
                       cfg_interval=variant.cfg_interval, cads=variant.cads,
                       repulsion_scale=variant.repulsion_scale,
                       feedback_scale=variant.scale if feedback else 0.0,
                       criterion=variant.criterion if feedback else "entropy",
                       feedback_every=cfg.feedback_every_for(steps), feedback_mode=variant.feedback_mode,
                       grad_path=variant.grad_path, embedding_dropout=0.0,
                       classifier_mean=(0.5,) * cfg.channels, classifier_std=(0.5,) * cfg.channels)
    needs_stats = feedback and get_criterion(variant.criterion).needs_stats
    return FeedbackGuidedSampler(unet, None, classifier, sched, sc, stats=stats if needs_stats else None)


def _sample_fn(sampler):
    """The production loop's sampler call: class-label conditioning, uint8 images out (all channels)."""
    from .conditioning import Conditioning

    def sample_fn(prompts, exemplars, labels, seeds):
        y = torch.tensor(labels)
        cond = Conditioning(class_labels=y, negative_class_labels=torch.full_like(y, NUM_CLASSES))
        out = sampler.sample(cond, y, seeds)
        img = torch.nan_to_num(out.images, nan=0.0)
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8)
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.permute(0, 2, 3, 1)
        return arr.numpy(), out.criterion.tolist(), out.nan.tolist()

    return sample_fn


def _write_grid(out: Path, samples: dict, per_class: int = 10) -> None:
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
        save_image(grid, str(out / f"samples-{_slug(variant)}.png"), nrow=per_class, padding=2, pad_value=0.5)


def _write_bars(path: Path, results: dict, groups=("overall", "many", "medium", "few")) -> None:
    """accuracy.png: grouped bars (one group per metric in ``groups``) per variant, drawn with PIL."""
    from PIL import Image, ImageDraw

    names = list(results)
    colors = [(90, 90, 90), (120, 170, 230), (240, 160, 60), (110, 190, 110), (200, 90, 170), (230, 90, 80),
              (150, 120, 210), (90, 200, 200), (190, 190, 70)]
    h, left, bottom, top = 360, 50, 60, 20
    w = max(760, left + 140 * len(names) + 10)
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    plot_h = h - bottom - top
    for pct in range(0, 101, 20):
        yy = top + plot_h * (1 - pct / 100)
        d.line([(left, yy), (w - 10, yy)], fill=(225, 225, 225))
        d.text((8, yy - 6), f"{pct}%", fill="black")
    gw = (w - left - 10) / len(groups)
    bw = (gw - 20) / len(names)
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + 10
        d.text((x0 + gw / 2 - 25, h - bottom + 8), g.replace("_", " "), fill="black")
        for ni, n in enumerate(names):
            v = results[n].get(g)
            if v is None:
                continue
            xa = x0 + ni * bw
            d.rectangle([xa, top + plot_h * (1 - v), xa + bw - 2, top + plot_h],
                        fill=colors[ni % len(colors)])
    for ni, n in enumerate(names):
        d.rectangle([left + ni * 140, h - 22, left + ni * 140 + 10, h - 12], fill=colors[ni % len(colors)])
        d.text((left + ni * 140 + 14, h - 24), n, fill="black")
    im.save(path)
