"""The embedded end-to-end demo (``fgds demo``, ``make demo``): does feedback help the few-shot classes?

Data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes), upsampled to 16x16 (bilinear, [-1, 1]).
A balanced test set (50 per class); a long-tailed classifier training set drawn from the rest (exponential
profile, imbalance ratio 60: 120 images in the head class, 2 in the tail; which digit is rare depends on the
seed). As in the paper, the generator knows more than the classifier: a class-conditional pixel-space
diffusion model (diffusers UNet2DModel, a null class for classifier-free guidance) is trained on *all*
non-test images, the classifier on the long-tailed subset only.

The synthetic budget (each class filled to the head class's count) is planned and generated through the
production path (``plan.make_plan``, ``production.generate_dataset``) once per variant -- no feedback, loss,
entropy, hardness -- with the same jobs and seeds, so the variants differ only by the feedback. A classifier
is retrained on real + synthetic for each (50/50 batches, Balanced Softmax with the prior the batches have)
and evaluated on the test set per shot group. Everything trained or generated is cached in OUT/cache.
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

from .data import progress_bar
from .train import TrainConfig, evaluate, format_table, predict, shot_groups, train_classifier

VARIANTS = ("no feedback", "loss", "entropy", "hardness")
NUM_CLASSES = 10


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs (defaults: measured on a 2-core CPU to finish in about 3 minutes cold)."""

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

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A minute-long run for tests and CI: every stage, tiny budgets (numbers mean nothing)."""
        return cls(seed=seed, gen_steps=40, sample_steps=6, feedback_every=2, clf_epochs=3, oracle_epochs=3,
                   budget_cap=6, sample_batch=64)


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


class SmallCNN(nn.Sequential):
    """The demo's classifier: three conv blocks and a linear head (its input: the penultimate features)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
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
    """Class-conditional pixel-space UNet2DModel (class NUM_CLASSES is the null class) and its scheduler."""
    from diffusers import DDIMScheduler, UNet2DModel

    levels = len(cfg.gen_channels)
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=cfg.gen_channels,
                       layers_per_block=1, down_block_types=down,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                       num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          timestep_spacing="trailing", set_alpha_to_one=True)
    return unet, sched


def train_generator(unet, sched, x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig, progress: bool) -> None:
    """DDPM epsilon-prediction training with label dropout to the null class (for CFG)."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.gen_lr, weight_decay=0.0)
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
    unet.eval()


# ----------------------------------------------------------------------------------------------- demo


def _images_to_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """The long-tailed training set as an ImageFolder of PNGs (the production path reads exemplars there)."""
    from PIL import Image

    for k, (img, c) in enumerate(zip(x, y.tolist())):
        d = root / f"{c}"
        d.mkdir(parents=True, exist_ok=True)
        arr = ((img[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{k:05d}.png")


def _read_folder(root: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images written by the production path, back to [N, 1, 16, 16] in [-1, 1]."""
    from PIL import Image

    xs, ys = [], []
    for c in classes:
        for p in sorted((root / c).glob("*.png")):
            with Image.open(p) as im:
                xs.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32)))
            ys.append(int(c))
    if not xs:
        return torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long)
    return (torch.stack(xs)[:, None] / 127.5 - 1), torch.tensor(ys)


def _entropy(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = model(x).softmax(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def run_demo(out: str | Path = "demo_out", *, config: DemoConfig | None = None, progress: bool = True,
             log=print) -> dict:
    """Run the whole demo; print the accuracy table; write metrics.json, samples-*.png and accuracy.png."""

    cfg = config or DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the same numbers whatever the machine's core count
    try:
        return _run_demo(out, cfg, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, cfg: DemoConfig, progress: bool, log) -> dict:
    from .criteria import GaussianClassStats
    from .data import scan_imagefolder
    from .models import Classifier
    from .plan import PlanOptions, make_plan, write_plan
    from .production import GenerateOptions, generate_dataset

    out = Path(out)
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
    with torch.no_grad():
        feats = torch.cat([Classifier(baseline)(x[lt][i:i + 256], with_features=True)[1]
                           for i in range(0, len(lt), 256)])
    stats = GaussianClassStats.fit(feats, y[lt], NUM_CLASSES)
    log(f"synthetic budget: {len(plan.jobs)} images (the same jobs and seeds for every variant)")
    samples, sample_stats = {}, {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        folder = out / "cache" / f"synthetic-{variant.replace(' ', '-')}-{cache.path('s', asdict(cfg)).stem}"
        write_plan(plan, folder)
        sampler = _sampler(unet, sched, baseline, cfg, variant, stats)
        report = generate_dataset(plan, folder, _sample_fn(sampler),
                                  GenerateOptions(batch_size=cfg.sample_batch), {"variant": variant},
                                  progress=False)
        xs, ys = _read_folder(folder, scan.classes)
        samples[variant] = (xs, ys)
        fidelity = float((predict(oracle, xs) == ys).float().mean()) if len(xs) else float("nan")
        sample_stats[variant] = {"mean_entropy": _entropy(baseline, xs) if len(xs) else float("nan"),
                                 "fidelity": fidelity, "generated_now": report.generated}
        clf_key = data_key | asdict(clf_cfg) | {"variant": variant, "gen": gen_key, "samples": asdict(cfg)}
        model = cache.model(f"classifier-{variant.replace(' ', '-')}", clf_key, SmallCNN,
                            lambda m, xs=xs, ys=ys: train_classifier(
                                m, _tensor_ds(x[lt], y[lt]), y[lt].tolist(), _tensor_ds(xs, ys), ys.tolist(),
                                config=clf_cfg, num_classes=NUM_CLASSES))
        results[variant] = evaluate(predict(model, x[test]), y[test], counts)
        log(f"  {variant}: {report.generated} generated now, fidelity {fidelity:.1%}, "
            f"{time.perf_counter() - t0:.0f} s")
    table = format_table(results)
    log("\ntest accuracy (%), balanced test set; groups by training images: many > 100, medium 20-100, "
        "few < 20")
    log(table)
    log(f"\n{'synthetic samples':22} {'entropy':>8} {'fidelity':>9}")
    for v, s in sample_stats.items():
        log(f"{v:22} {s['mean_entropy']:8.3f} {s['fidelity']:9.1%}")
    _write_grid(out, samples, scan.classes)
    _write_bars(out / "accuracy.png", results)
    metrics = {"config": asdict(cfg), "train_counts": counts, "groups": groups, "accuracy": results,
               "samples": sample_stats, "seconds": time.perf_counter() - t_start}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"\nwrote {out / 'metrics.json'}, {out / 'accuracy.png'} and samples-<variant>.png "
        f"({metrics['seconds']:.0f} s)")
    return metrics


def _tensor_ds(x: torch.Tensor, y: torch.Tensor):
    return torch.utils.data.TensorDataset(x, y)


def _sampler(unet, sched, classifier, cfg: DemoConfig, variant: str, stats):
    """The engine for one variant: CFG on the null class, feedback from the long-tailed classifier."""
    from .sampler import FeedbackGuidedSampler, SamplerConfig

    feedback = variant != "no feedback"
    sc = SamplerConfig(num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                       feedback_scale=cfg.feedback_scale if feedback else 0.0,
                       criterion=variant if feedback else "entropy", feedback_every=cfg.feedback_every,
                       embedding_dropout=0.0, classifier_mean=(0.5,), classifier_std=(0.5,))
    return FeedbackGuidedSampler(unet, None, classifier, sched, sc,
                                 stats=stats if variant == "hardness" else None)


def _sample_fn(sampler):
    """The production loop's sampler call: class-label conditioning, grayscale uint8 images out."""
    from .conditioning import Conditioning

    def sample_fn(prompts, exemplars, labels, seeds):
        y = torch.tensor(labels)
        cond = Conditioning(class_labels=y, negative_class_labels=torch.full_like(y, NUM_CLASSES))
        out = sampler.sample(cond, y, seeds)
        img = torch.nan_to_num(out.images[:, 0], nan=0.0)
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        return arr, out.criterion.tolist(), out.nan.tolist()

    return sample_fn


def _write_grid(out: Path, samples: dict, classes: list[str], per_class: int = 10) -> None:
    """samples-<variant>.png: one row per class, ``per_class`` samples each, 4x enlarged."""
    from torchvision.utils import save_image

    for variant, (xs, ys) in samples.items():
        tiles = []
        for c in range(NUM_CLASSES):
            own = xs[ys == c][:per_class]
            pad = torch.full((per_class - len(own), 1, 16, 16), -1.0)
            tiles.append(torch.cat([own, pad]))
        grid = torch.cat(tiles) / 2 + 0.5
        grid = F.interpolate(grid, scale_factor=4, mode="nearest")
        save_image(grid, str(out / f"samples-{variant.replace(' ', '-')}.png"), nrow=per_class, padding=2,
                   pad_value=0.5)


def _write_bars(path: Path, results: dict) -> None:
    """accuracy.png: grouped bars (overall, many, medium, few) per variant, drawn with PIL."""
    from PIL import Image, ImageDraw

    groups = ["overall", "many", "medium", "few"]
    names = list(results)
    colors = [(90, 90, 90), (120, 170, 230), (240, 160, 60), (110, 190, 110), (200, 90, 170)]
    w, h, left, bottom, top = 760, 360, 50, 60, 20
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
        d.text((x0 + gw / 2 - 25, h - bottom + 8), g, fill="black")
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
