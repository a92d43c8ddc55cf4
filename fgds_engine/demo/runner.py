"""One runner for both demo settings. The stages are the same, in the same order:
1. data;
2. the generator, the oracle and the real-only classifier (cached);
3. the synthetic budget through the production path, with the same jobs and seeds for every variant;
4. per variant: samples, fidelity, a classifier retrained on real + synthetic, its test metrics (and
   with ``budget_caps``, one per cap on the first k synthetic images of every class);
5. the timing of every variant's sampler, interleaved;
6. tables, sample grids, accuracy bars, metrics.json.

What differs between settings (``LongTail``, ``Groups``) is its data, its cache names, its metrics and its
tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..bench.timing import versions
from ..progress_bars import progress_bar
from ..train import TrainConfig, evaluate, format_table, predict, shot_groups, train_classifier
from .config import COLORS, NUM_CLASSES, PALETTE, PRIORS, DemoConfig, Variant
from .data import (
    color_report,
    group_counts,
    group_metrics,
    images_to_folder,
    load_digits16,
    majority_color,
    make_group_data,
    read_folder,
    split,
    stroke_colors,
    tensor_ds,
)
from .gate import generator_line, measure_generator
from .models import (
    Cache,
    SmallCNN,
    class_stats,
    entropy,
    make_generator,
    seeded,
    torch_threads,
    train_generator,
)
from .report import GROUP_COLUMNS, color_table, samples_table, slug, write_bars, write_grid
from .sampling import label_sample_fn, objective_key, sample_key, variant_sampler


def run_demo(out: str | Path = "demo_out", *, config: DemoConfig | None = None, progress: bool = True,
             log=print) -> dict:
    """Run one setting's demo; print its tables; write metrics.json, samples-*.png and accuracy.png to OUT."""
    cfg = config or DemoConfig()
    with torch_threads(cfg.threads):  # the same numbers whatever the machine's core count
        return _run(Path(out), cfg, progress, log)


# ------------------------------------------------------------------------------------------------ settings


class LongTail:
    """Digits with a long-tailed classifier set: accuracy per shot group (many / medium / few)."""

    suffix, real_prefix, columns = "", "lt", ("overall", "many", "medium", "few")

    def __init__(self, cfg: DemoConfig, log):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        x, y = load_digits16()
        test, pool, lt = split(x, y, cfg)
        self.counts = torch.bincount(y[lt], minlength=NUM_CLASSES).tolist()
        self.groups = shot_groups(self.counts)
        log(f"digits 16x16: {len(test)} test (balanced), {len(pool)} non-test; long-tailed classifier set "
            f"{len(lt)} images, per class {self.counts} (many: {self.groups['many']}, medium: "
            f"{self.groups['medium']}, few: {self.groups['few']})")
        self.test = (x[test], y[test])
        self.train, self.generator = (x[lt], y[lt]), (x[pool], y[pool])
        self.oracle = self.generator  # the oracle learns from every non-test digit, as the generator
        self.data_key = {"seed": cfg.seed, "head": cfg.head, "imbalance": cfg.imbalance,
                         "test": cfg.test_per_class}
        self.gen_key = self.data_key | {k: getattr(cfg, k) for k in (
            "gen_channels", "gen_steps", "gen_batch", "gen_lr", "label_dropout")} | objective_key(cfg)
        self.models_line = ("models (pixel-space diffusion on ALL non-test digits; classifiers on the "
                            "long-tailed set):")
        self.min_per_class = 0

    def build(self):
        return SmallCNN()  # from torch's global generator, seeded once at the start (the cached runs' order)

    def evaluate(self, model) -> dict:
        return evaluate(predict(model, self.test[0]), self.test[1], self.counts)

    def after_baseline(self, results: dict) -> None:
        pass

    def budget(self, plan) -> str:
        if self.cfg.budget_cap is not None:
            plan.jobs = [j for j in plan.jobs if int(j.job_id.split("_")[1]) < self.cfg.budget_cap]
        return f"synthetic budget: {len(plan.jobs)} images (the same jobs and seeds for every variant)"

    def variant_key(self, variant: Variant):
        return variant.name

    def sample_stats(self, variant, xs, ys, fidelity, baseline, generated, timing) -> dict:
        return {"mean_entropy": entropy(baseline, xs) if len(xs) else float("nan"), "fidelity": fidelity,
                "generated_now": generated}

    def report(self, results: dict, stats: dict, log) -> None:
        log("\ntest accuracy (%), balanced test set; groups by training images: many > 100, medium 20-100, "
            "few < 20")
        log(format_table(results))
        log(f"\n{'synthetic samples':22} {'entropy':>8} {'fidelity':>9}")
        for v, s in stats.items():
            log(f"{v:22} {s['mean_entropy']:8.3f} {s['fidelity']:9.1%}")

    def metrics_head(self) -> dict:
        return {"train_counts": self.counts, "groups": self.groups}


class Groups:
    """Colored digits, colors spuriously tied to the class: worst-group, minority and majority accuracy, and
    the stroke colors of the samples."""

    suffix, real_prefix, columns = "-groups", "groups", GROUP_COLUMNS

    def __init__(self, cfg: DemoConfig, log):
        self.cfg = cfg
        x, y = load_digits16()
        data = make_group_data(x, y, cfg)
        xt, yt, ct = data.test
        xc, yc, cc = data.classifier
        xg, yg, cg = data.generator
        xo, yo, _ = data.oracle
        minority_train = (cc != majority_color(yc)).sum().item()
        log(f"colored digits 16x16 ({', '.join(COLORS)}; digit d's majority color: {COLORS[0]} for 0, 4, 8, "
            f"{COLORS[1]} for 1, 5, 9, ...): test {len(xt)} images (50 digits per class x 4 colors: "
            f"{cfg.test_per_class} per group); classifier set {len(xc)} ({len(xc) // NUM_CLASSES} per class, "
            f"{len(xc) - minority_train} in majority groups, {minority_train} in minority ones); generator "
            f"set {len(xg)} (color prior {cfg.color_prior}: {PRIORS[cfg.color_prior]:.0%} majority)")
        self.test, self.test_colors = (xt, yt), ct
        self.train, self.train_colors = (xc, yc), cc
        self.generator, self.generator_colors = (xg, yg), cg
        self.oracle = (xo, yo)
        self.data_key = {"setting": "groups", "seed": cfg.seed, "test": cfg.test_per_class,
                         "majority": cfg.classifier_majority, "jitter": cfg.color_jitter}
        self.gen_key = self.data_key | {"prior": cfg.color_prior} | {k: getattr(cfg, k) for k in (
            "gen_channels", "gen_steps", "gen_batch", "gen_lr", "label_dropout", "ema_decay")
        } | objective_key(cfg)
        self.models_line = ("models (pixel-space diffusion on ALL non-test digits, conditioned on the digit "
                            "only; classifiers on the color-skewed set):")
        self.min_per_class = cfg.synthetic_per_class

    def build(self):
        return seeded(self.cfg.seed, lambda: SmallCNN(channels=3))

    def evaluate(self, model) -> dict:
        return group_metrics(predict(model, self.test[0]), self.test[1], self.test_colors)

    def after_baseline(self, results: dict) -> None:
        # the color the real-only classifier reads worst, per digit: where feedback should send samples
        per_group = results["real only"]["per_group"]
        self.worst_color = torch.tensor([min(range(len(COLORS)), key=lambda k, d=d: (
            per_group[f"{d} {COLORS[k]}"], k)) for d in range(NUM_CLASSES)])

    def budget(self, plan) -> str:
        return (f"synthetic budget: {len(plan.jobs)} images, {self.cfg.synthetic_per_class} per class (the "
                "same jobs and seeds for every variant)")

    def variant_key(self, variant: Variant):
        return variant.key()

    def sample_stats(self, variant, xs, ys, fidelity, baseline, generated, timing) -> dict:
        colors, nearest = stroke_colors(xs), stroke_colors(xs, margin=float("inf"))
        in_worst = (colors == self.worst_color[ys]).float().mean().item() if len(xs) else float("nan")
        return {"criterion": variant.criterion, "scale": variant.scale, "grad_path": variant.grad_path,
                "fidelity": fidelity, "mean_entropy": entropy(baseline, xs) if len(xs) else float("nan"),
                **color_report(ys, colors), "worst_color_share": in_worst,
                "nearest": color_report(ys, nearest), "generated_now": generated,
                "generation_seconds_per_image": timing["seconds"] / timing["images"] if timing else None}

    def report(self, results: dict, stats: dict, log) -> None:
        log(f"\ntest accuracy (%), balanced test set ({self.cfg.test_per_class} images per group = digit x "
            f"color); worst of the {NUM_CLASSES * len(COLORS)} groups; minority: the 3 colors that are not "
            f"the digit's majority")
        log(format_table(results, GROUP_COLUMNS, ("overall", "worst group", "minority", "majority")))
        log(samples_table(stats))
        log(color_table(stats))

    def metrics_head(self) -> dict:
        return {"setting": "groups", "palette": PALETTE,
                "train_groups": group_counts(self.train[1], self.train_colors),
                "generator_groups": group_counts(self.generator[1], self.generator_colors),
                "real_only_worst_color": [COLORS[k] for k in self.worst_color.tolist()]}


# ------------------------------------------------------------------------------------------------ the runner


@dataclass
class Prepared:
    """What every run of a setting starts from: the setting, the cache, the generator and the oracle, the
    real-only classifier (``baseline``) and its results, the real set as a folder (``scan``) and its plan,
    and the hardness statistics."""

    s: object
    cache: Cache
    clf_cfg: TrainConfig
    unet: object
    sched: object
    oracle: object
    baseline: object
    results: dict
    scan: object
    plan: object
    stats: object
    generator: dict | None


def prepare(out: Path, cfg: DemoConfig, progress: bool = False, log=print, *, gate: bool = True) -> Prepared:
    """Stages 1-2 of a demo run, as ``run_demo`` runs them (same caches, same order of random draws);
    ``gate``: also measure the generator (the demos print it; an experiment may skip it)."""
    from ..data import scan_imagefolder
    from ..plan import PlanOptions, make_plan

    cache = Cache(out / "cache", log)
    s = (Groups if cfg.setting == "groups" else LongTail)(cfg, log)
    clf_cfg = TrainConfig(epochs=cfg.clf_epochs, seed=cfg.seed)
    name = lambda base: base + s.suffix  # noqa: E731  the cache names of the setting

    log(s.models_line)
    unet, sched, oracle = generator_and_oracle(cache, cfg, s, progress)
    xc, yc = s.train
    baseline = cache.model(name("baseline"), s.data_key | asdict(clf_cfg), s.build,
                           lambda m: train_classifier(m, tensor_ds(xc, yc), yc.tolist(), config=clf_cfg,
                                                      num_classes=NUM_CLASSES))
    generator = None
    if gate:
        generator = measure_generator(unet, sched, oracle, cfg, per_class=min(30, cfg.synthetic_per_class),
                                      train_colors=getattr(s, "generator_colors", None))
        generator["training"] = cache.info(name("generator"), s.gen_key)
        log(generator_line(generator))
    results = {"real only": s.evaluate(baseline)}
    s.after_baseline(results)

    real_dir = cache.folder / f"{s.real_prefix}-real-{cache.path(s.real_prefix, s.data_key).stem}"
    if not real_dir.exists():
        images_to_folder(real_dir, xc, yc)
    scan = scan_imagefolder(real_dir, verify=False)
    plan = make_plan(scan, PlanOptions(run_seed=cfg.seed, min_per_class=s.min_per_class))
    return Prepared(s, cache, clf_cfg, unet, sched, oracle, baseline, results, scan, plan,
                    class_stats(baseline, xc, yc), generator)


def _run(out: Path, cfg: DemoConfig, progress: bool, log) -> dict:
    t_start = time.perf_counter()
    p = prepare(out, cfg, progress, log)
    s, cache, clf_cfg, plan, scan, stats = p.s, p.cache, p.clf_cfg, p.plan, p.scan, p.stats
    unet, sched, oracle, baseline, results, generator = p.unet, p.sched, p.oracle, p.baseline, p.results, \
        p.generator
    xc, yc = s.train
    name = lambda base: base + s.suffix  # noqa: E731  the cache names of the setting
    budget_line = s.budget(plan)
    log(budget_line)
    samples, sample_stats, samplers, budget = {}, {}, {}, {}
    for variant in progress_bar(cfg.variants(), progress, desc="  variants", unit="variant", leave=False):
        t0 = time.perf_counter()
        samplers[variant.name] = sampler = variant_sampler(unet, sched, baseline, cfg, variant, stats)
        xs, ys, generated, timing = synthesize(cache, cfg, plan, scan.classes, variant, sampler)
        samples[variant.name] = (xs, ys)
        fidelity = float((predict(oracle, xs) == ys).float().mean()) if len(xs) else float("nan")
        sample_stats[variant.name] = s.sample_stats(variant, xs, ys, fidelity, baseline, generated, timing)
        clf_key = s.data_key | asdict(clf_cfg) | {"variant": s.variant_key(variant), "gen": s.gen_key,
                                                  "samples": sample_key(cfg)}
        model = cache.model(name("classifier") + f"-{slug(variant.name)}", clf_key, s.build,
                            lambda m, xs=xs, ys=ys: train_classifier(
                                m, tensor_ds(xc, yc), yc.tolist(), tensor_ds(xs, ys), ys.tolist(),
                                config=clf_cfg, num_classes=NUM_CLASSES))
        results[variant.name] = s.evaluate(model)
        if cfg.budget_caps:
            budget[variant.name] = _budget_curve(cache, cfg, s, clf_cfg, clf_key, variant, xs, ys,
                                                 results[variant.name])
        log(f"  {variant.name}: {generated} generated now, fidelity {fidelity:.1%}, "
            f"{time.perf_counter() - t0:.0f} s")
    per_image = time_variants(samplers, plan, cfg)
    for v, st in sample_stats.items():
        st["seconds_per_image"] = per_image[v]
        st["time_vs_no_feedback"] = per_image[v] / per_image["no feedback"]
    s.report(results, sample_stats, log)
    log(generator_line(generator))
    write_grid(out, samples)
    write_bars(out / "accuracy.png", results, s.columns)
    metrics = {"config": asdict(cfg), **s.metrics_head(), "generator": generator, "accuracy": results,
               "samples": sample_stats, "seconds": time.perf_counter() - t_start,
               "machine": versions()}  # the CPU too: its vector unit rounds the floats (README, Machines)
    if budget:
        metrics["budget"] = budget
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"\nwrote {out / 'metrics.json'}, {out / 'accuracy.png'} and samples-<variant>.png "
        f"({metrics['seconds']:.0f} s)")
    return metrics


def generator_and_oracle(cache: Cache, cfg: DemoConfig, s, progress: bool):
    """The setting's generator, its scheduler and the oracle, trained or from the cache."""
    name = lambda base: base + s.suffix  # noqa: E731
    unet, sched = make_generator(cfg)
    unet = cache.model(name("generator"), s.gen_key, lambda: unet,
                       lambda m: train_generator(m, sched, *s.generator, cfg, progress))
    oracle_cfg = TrainConfig(epochs=cfg.oracle_epochs, seed=cfg.seed, balanced_softmax=False)
    oracle = cache.model(name("oracle"), s.data_key | {"epochs": cfg.oracle_epochs}, s.build,
                         lambda m: train_classifier(m, tensor_ds(*s.oracle), s.oracle[1].tolist(),
                                                    config=oracle_cfg))
    return unet, sched, oracle


def first_per_class(ys: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the first ``k`` samples of every class, in order (the samples of a production folder
    come back per class in job order, so these are the jobs a ``budget_cap`` of k keeps)."""
    keep = [(ys == c).nonzero().flatten()[:k] for c in ys.unique().tolist()]
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)


def _budget_curve(cache: Cache, cfg: DemoConfig, s, clf_cfg: TrainConfig, clf_key: dict, variant: Variant,
                  xs: torch.Tensor, ys: torch.Tensor, full: dict) -> dict:
    """{cap: the test metrics of a classifier on the real set + the first cap synthetic images of every class,
    and "images": how many} for each of ``cfg.budget_caps``, and "fill" (the full budget: ``full``). A cap
    that keeps every sample is the full budget's classifier. Each is initialised from the seed, and torch's
    global generator comes back as it was: the full-budget classifiers are those of a run without caps."""
    xc, yc = s.train
    out = {}
    with torch.random.fork_rng(devices=[]):
        for k in cfg.budget_caps:
            keep = first_per_class(ys, k)
            if len(keep) == len(ys):
                out[str(k)] = full | {"images": len(ys)}
                continue
            xk, yk = xs[keep], ys[keep]
            model = cache.model(f"classifier{s.suffix}-{slug(variant.name)}-cap{k}",
                                clf_key | {"budget_cap": k}, lambda: seeded(cfg.seed, s.build),
                                lambda m, xk=xk, yk=yk: train_classifier(
                                    m, tensor_ds(xc, yc), yc.tolist(), tensor_ds(xk, yk), yk.tolist(),
                                    config=clf_cfg, num_classes=NUM_CLASSES))
            out[str(k)] = s.evaluate(model) | {"images": len(keep)}
    out["fill"] = full | {"images": len(ys)}
    return out


def synthesize(cache: Cache, cfg: DemoConfig, plan, classes: list[str], variant: Variant,
               sampler, tag: str = "") -> tuple[torch.Tensor, torch.Tensor, int, dict | None]:
    """One variant's synthetic images through the production path (cached per variant; ``tag`` names the
    folder of another plan of the same samples, e.g. an oversampled one): (images, labels in job order per
    class, images generated now, {"seconds", "images"} of the generation when it ran whole, else None)."""
    from ..plan import write_plan
    from ..production import GenerateOptions, generate_dataset

    folder = cache.folder / f"synthetic-{slug(variant.name)}{tag}-{cache.path('s', sample_key(cfg)).stem}"
    write_plan(plan, folder)
    t0 = time.perf_counter()
    report = generate_dataset(plan, folder, label_sample_fn(sampler),
                              GenerateOptions(batch_size=cfg.sample_batch),
                              {"variant": variant.name}, progress=False)
    seconds = time.perf_counter() - t0
    timing = folder / "timing.json"
    if report.generated == len(plan.jobs) and report.generated:
        timing.write_text(json.dumps({"seconds": seconds, "images": report.generated}) + "\n")
    xs, ys = read_folder(folder, classes, cfg.channels)
    return xs, ys, report.generated, json.loads(timing.read_text()) if timing.exists() else None


def time_variants(samplers: dict, plan, cfg: DemoConfig) -> dict[str, float]:
    """Seconds per image of each variant's sampler on the plan's first batch of jobs (the production call,
    PNG encoding aside): ``bench.fastest_interleaved`` (alternating rounds after a warm-up, the fastest of
    ``cfg.timing_repeats``), so every variant sees the same machine state, whichever ran first or was
    cached."""
    from ..bench import fastest_interleaved

    jobs = plan.jobs[:cfg.sample_batch]
    labels, seeds = [j.class_index for j in jobs], [j.seed for j in jobs]
    fns = {name: label_sample_fn(s) for name, s in samplers.items()}
    for fn in fns.values():
        fn(None, None, labels[:4], seeds[:4])
    calls = {name: (lambda fn=fn: fn(None, None, labels, seeds)) for name, fn in fns.items()}
    best = fastest_interleaved(calls, torch.device("cpu"), repeats=cfg.timing_repeats, warmup=False)
    return {name: t / len(jobs) for name, t in best.items()}


