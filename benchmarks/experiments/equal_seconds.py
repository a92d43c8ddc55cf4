"""Guidance against its rivals at equal generation seconds: more unguided images, unguided without CFG,
generate-then-select, allocation by the classifier's errors, feedback, and feedback combined with them. The
grid, the seeds and the rule were declared in docs/experiments.md before any run ("Guidance against its
rivals at equal seconds: the declaration"); the constants below are that declaration.

    python benchmarks/experiments/equal_seconds.py --setting groups-milder|groups-matched|long-tail \\
        [--seeds 0 1 2] [--quick] [--out DIR] [--json FILE]

Per seed, four samplers (unguided at CFG 1.5 and 1.0, loss and entropy feedback) each generate K_MAX x B jobs
per class through the production path (``fgds plan --oversample``'s jobs: the first B of each class are the
plain plan's), and every row is a subset of one of them: the first ceil(m x B_c) of each class (more images),
the B_c a criterion ranks highest among the first ceil(K x B_c) (selection, scored by the real-only
classifier), or the first A_c, the budget split by the real-only classifier's 5-fold cross-validated errors
(allocation, ``plan.split_budget``). One classifier per row, trained as the demo trains its own. A row's
seconds: its generated images x its sampler's seconds per image (timed interleaved) + the scoring passes
of a selection (timed interleaved). Each seed's rows go to the JSON as they come, with the commit, the machine
and the wall seconds of each run of the seed ("runs"): an interrupted run resumes from its seeds and the demo
caches; a JSON of another grid is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fgds_engine.bench.timing import commit, versions
from fgds_engine.demo import DemoConfig
from fgds_engine.demo.charts import equal_seconds
from fgds_engine.demo.config import NUM_CLASSES
from fgds_engine.demo.data import tensor_ds
from fgds_engine.demo.experiment import mean_std, read_json, write_json
from fgds_engine.demo.models import seeded
from fgds_engine.demo.report import slug
from fgds_engine.demo.runner import prepare, synthesize, time_variants
from fgds_engine.demo.sampling import sample_key, variant_sampler

# ------------------------------------------------------------------------------- the declaration (constants)
SETTINGS = {"groups-milder": ("groups", "milder"), "groups-matched": ("groups", "matched"),
            "long-tail": ("long-tail", None)}
Y = {"groups": ("minority", "worst5", "worst_group", "overall"), "long-tail": ("few", "overall")}
DEV_SEEDS, TEST_SEEDS = (0, 1, 2), (20, 21, 22, 23, 24)
K_MAX = 4
SAMPLERS = {"unguided": (None, 0.0, None), "unguided cfg 1.0": (None, 0.0, 1.0), "loss": ("loss", 0.03, None),
            "entropy": ("entropy", 0.03, None)}
MORE = {"unguided": (1, 1.15, 1.5, 2), "unguided cfg 1.0": (1, 2, 4)}
SELECT, SELECT_K, MIX = ("entropy", "loss", "hardness", "mix"), (1.5, 2, 4), 0.5
FEEDBACK = ("loss", "entropy")
FOLDS, FLOOR, POWER = 5, 1, 1.0
GRID = {"k_max": K_MAX, "samplers": SAMPLERS, "more": MORE, "select": SELECT, "select_k": SELECT_K,
        "mix": MIX, "folds": FOLDS, "floor": FLOOR, "power": POWER, "dev": DEV_SEEDS, "test": TEST_SEEDS}


def config(setting: str, seed: int, quick: bool) -> DemoConfig:
    kind, prior = SETTINGS[setting]
    recipes = tuple(SAMPLERS.values())
    if kind == "groups":
        return (DemoConfig.quick(seed, "groups", color_prior=prior, recipes=recipes) if quick
                else DemoConfig.groups(seed, prior, recipes=recipes))
    return DemoConfig.quick(seed, recipes=recipes) if quick else DemoConfig(seed=seed, recipes=recipes)


# ------------------------------------------------------------------------------------------------ subsets
def first(ys: torch.Tensor, counts: dict[int, int]) -> torch.Tensor:
    """The indices of the first counts[c] samples of each class c (samples are in job order per class)."""
    return torch.cat([(ys == c).nonzero().flatten()[:counts[c]] for c in sorted(counts)])


def ranked(ys: torch.Tensor, score: torch.Tensor, pool: dict[int, int], keep: dict[int, int]) -> torch.Tensor:
    """Per class, the keep[c] highest scores among its first pool[c] samples (ties: the earlier job)."""
    out = []
    for c in sorted(keep):
        idx = (ys == c).nonzero().flatten()[:pool[c]]
        order = sorted(idx.tolist(), key=lambda i: (-float(score[i]), i))
        out.append(torch.tensor(sorted(order[:keep[c]]), dtype=torch.long))
    return torch.cat(out)


def mixed(ys, score, pool, keep, seed: int) -> torch.Tensor:
    """floor(MIX x keep[c]) by score, the rest at random (seeded) from the others of the pool."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in sorted(keep):
        idx = (ys == c).nonzero().flatten()[:pool[c]].tolist()
        top = sorted(idx, key=lambda i: (-float(score[i]), i))[:math.floor(MIX * keep[c])]
        rest = [i for i in idx if i not in top]
        pick = [rest[j] for j in torch.randperm(len(rest), generator=g)[:keep[c] - len(top)].tolist()]
        out.append(torch.tensor(sorted(top + pick), dtype=torch.long))
    return torch.cat(out)


def pick(crit: str, ys, score: dict, pool, keep, seed: int) -> torch.Tensor:
    return mixed(ys, score["entropy"], pool, keep, seed) if crit == "mix" else ranked(ys, score[crit], pool,
                                                                                     keep)


def scores(p, xs: torch.Tensor, ys: torch.Tensor) -> tuple[dict, dict]:
    """Per criterion: the real-only classifier's score of every sample, and its seconds per image (the
    passes timed interleaved)."""
    from fgds_engine.bench import fastest_interleaved
    from fgds_engine.criteria import criterion_values
    from fgds_engine.models import Classifier

    clf = Classifier(p.baseline).eval()

    def run(name):
        with torch.no_grad():
            logits, feats = clf(xs, with_features=True)
            return criterion_values(name, logits, ys, feats, p.stats if name == "hardness" else None)

    crits = [c for c in SELECT if c != "mix"]
    best = fastest_interleaved({c: (lambda c=c: run(c)) for c in crits}, torch.device("cpu"), repeats=3)
    return {c: run(c) for c in crits}, {c: t / len(xs) for c, t in best.items()}


def cv_errors(p, cfg: DemoConfig) -> dict[int, float]:
    """Per class: the error rate of the real-only classifier's recipe over FOLDS held-out folds of the
    classifier set (folds seeded; never the test set)."""
    from fgds_engine.train import predict, train_classifier

    xc, yc = p.s.train
    fold = torch.randperm(len(yc), generator=torch.Generator().manual_seed(cfg.seed)) % FOLDS
    wrong = torch.zeros(NUM_CLASSES)
    for f in range(FOLDS):
        tr, te = fold != f, fold == f
        model = p.cache.model(f"cv{p.s.suffix}-{f}", p.s.data_key | {"fold": f, "folds": FOLDS,
                                                                     "epochs": p.clf_cfg.epochs},
                              lambda f=f: seeded(cfg.seed + 1 + f, p.s.build),
                              lambda m, tr=tr: train_classifier(m, tensor_ds(xc[tr], yc[tr]), yc[tr].tolist(),
                                                                config=p.clf_cfg, num_classes=NUM_CLASSES))
        miss = predict(model, xc[te]) != yc[te]
        wrong += torch.bincount(yc[te][miss], minlength=NUM_CLASSES).float()
    return {c: float(wrong[c] / (yc == c).sum()) for c in range(NUM_CLASSES)}


# ------------------------------------------------------------------------------------------------ a seed
def run_seed(setting: str, seed: int, quick: bool, out: Path, best_select: tuple | None = None) -> dict:
    """Every row of one seed: {row: {metrics (fractions), "images", "seconds", "sampler"}}."""
    from fgds_engine.plan import PlanOptions, make_plan, split_budget
    from fgds_engine.train import train_classifier

    cfg = config(setting, seed, quick)
    p = prepare(out / setting / f"seed{seed}", cfg, gate=False, log=lambda *a: None)
    plan = make_plan(p.scan, PlanOptions(run_seed=cfg.seed, min_per_class=p.s.min_per_class,
                                         oversample=K_MAX))
    cap = cfg.budget_cap if cfg.setting == "long-tail" else None
    b = {int(c): min(k, cap) if cap else k for c, k in p.plan.keep.items()}  # B_c: the demo's budget
    plan.jobs = [j for j in plan.jobs if int(j.job_id.split("_")[1]) < K_MAX * b[j.class_index]]
    samples, samplers = {}, {}
    for name, variant in zip(SAMPLERS, cfg.variants()):
        samplers[name] = variant_sampler(p.unet, p.sched, p.baseline, cfg, variant, p.stats)
        xs, ys, _, _ = synthesize(p.cache, cfg, plan, p.scan.classes, variant, samplers[name],
                                  tag=f"-x{K_MAX}")
        samples[name] = (xs, ys)
    per_image = time_variants(samplers, plan, cfg)
    xs, ys = samples["unguided"]
    score, score_s = scores(p, xs, ys)
    score["mix"], score_s["mix"] = score["entropy"], score_s["entropy"]
    alloc = split_budget(sum(b.values()), cv_errors(p, cfg), FLOOR, POWER)
    alloc = {c: min(a, K_MAX * b[c]) for c, a in alloc.items()}
    ceil = lambda m: {c: math.ceil(round(m * n, 6)) for c, n in b.items()}  # noqa: E731
    rows = {}  # name: (sampler, indices, generated images, scoring seconds)
    for name, ms in MORE.items():
        for m in ms:
            idx = first(samples[name][1], ceil(m))
            rows[f"{name} x{m:g}"] = (name, idx, len(idx), 0.0)
    for crit in SELECT:
        for k in SELECT_K:
            pool = ceil(k)
            idx = pick(crit, ys, score, pool, b, seed)
            n = sum(pool.values())
            rows[f"select {crit} K{k:g}"] = ("unguided", idx, n, n * score_s[crit])
    rows["allocation"] = ("unguided", first(ys, alloc), sum(alloc.values()), 0.0)
    for fb in FEEDBACK:
        fys = samples[fb][1]
        rows[fb] = (fb, first(fys, b), sum(b.values()), 0.0)
        rows[f"{fb} + allocation"] = (fb, first(fys, alloc), sum(alloc.values()), 0.0)
        if best_select is not None:
            crit, k = best_select
            fscore, _ = scores(p, *samples[fb])
            fscore["mix"] = fscore["entropy"]
            pool = ceil(k)
            idx = pick(crit, fys, fscore, pool, b, seed)
            rows[f"{fb} + select {crit} K{k:g}"] = (fb, idx, sum(pool.values()),
                                                   sum(pool.values()) * score_s[crit])
    xc, yc = p.s.train
    result = {"real only": {k: p.results["real only"][k] for k in Y[cfg.setting]} | {"images": 0,
                                                                                   "seconds": 0.0}}
    for row, (name, idx, generated, extra) in rows.items():
        sx, sy = samples[name][0][idx], samples[name][1][idx]
        digest = hashlib.sha256(json.dumps(idx.tolist()).encode()).hexdigest()[:16]
        key = p.s.data_key | {"samples": sample_key(cfg), "sampler": name, "subset": digest, "k_max": K_MAX,
                              "epochs": p.clf_cfg.epochs}
        model = p.cache.model(f"classifier{p.s.suffix}-eqs-{slug(row)}", key,
                              lambda: seeded(cfg.seed, p.s.build),
                              lambda m, sx=sx, sy=sy: train_classifier(
                                  m, tensor_ds(xc, yc), yc.tolist(), tensor_ds(sx, sy), sy.tolist(),
                                  config=p.clf_cfg, num_classes=NUM_CLASSES))
        metrics = p.s.evaluate(model)
        result[row] = {k: metrics[k] for k in Y[cfg.setting]} | {
            "images": len(idx), "generated": generated, "sampler": name,
            "seconds": generated * per_image[name] + extra}
    return result


# ------------------------------------------------------------------------------------------------ the rule
def rule(rows: dict, kind: str) -> dict:
    """On the development seeds: the best selection (criterion, K), the feedback recipe and the best rival
    (docs/experiments.md: the rule)."""
    y = Y[kind][0] if kind == "groups" else "few"
    # rounded to 1e-6 (1e-4 points): two rows whose seeds' accuracies add up to the same mean tie, and go to
    # the cheaper, even when float32 sums them 2e-8 apart (long-tail's loss / entropy + allocation did)
    mean = lambda r, k: round(statistics.mean(s[r][k] for s in rows.values()), 6)  # noqa: E731
    names = next(iter(rows.values())).keys()
    select = [r for r in names if r.startswith("select ")]
    best_select = max(select, key=lambda r: (mean(r, y), -mean(r, "seconds")))
    crit, k = best_select.split()[1], float(best_select.split()[2][1:])
    feedback = [r for r in names if r.split()[0] in FEEDBACK and "+ select" not in r]  # the four declared
    recipe = max(feedback, key=lambda r: (mean(r, y), -mean(r, "seconds")))
    budget = mean("loss", "seconds")
    rivals = [r for r in names if r.split()[0] not in FEEDBACK and r != "real only"
              and mean(r, "seconds") <= budget]
    rival = max(rivals, key=lambda r: (mean(r, y), -mean(r, "seconds")))
    return {"metric": y, "best_select": [crit, k], "feedback": recipe, "rival": rival}


def paired(rows: dict, a: str, b: str, keys) -> dict:
    out = {}
    for k in keys:
        # points, rounded to 1e-4: the same accuracy summed in another order is equal, not 1e-6 below
        d = [round(100 * (s[a][k] - s[b][k]), 4) for s in rows.values()]
        out[k] = mean_std(d) | {"above": sum(x > 0 for x in d), "equal": sum(x == 0 for x in d),
                                "below": sum(x < 0 for x in d)}
    return out


def summary(rows: dict, keys) -> str:
    """Per row (those every seed has): mean +- std over the seeds of each y (points) and of the seconds."""
    names = [r for r in next(iter(rows.values())) if all(r in s for s in rows.values())]
    cell = lambda r, k, f=100: mean_std([f * s[r][k] for s in rows.values()])  # noqa: E731
    w = max(26, *map(len, names))
    lines = [f"{'':{w}}" + "".join(f" {k:>13}" for k in (*keys, "seconds"))]
    for r in names:
        ms = [cell(r, k) for k in keys] + [cell(r, "seconds", 1)]
        lines.append(f"{r:{w}}" + "".join(f" {m['mean']:6.1f} +-{m['std']:4.1f}" for m in ms))
    return "\n".join(lines)


def loaded() -> str | None:
    """The commit this process loaded, "-dirty" when tracked files differ from it (read once, at import: a
    commit made while a long grid runs is not the code that grid runs)."""
    at = commit()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip() if at else ""
    return at and at + ("-dirty" if dirty else "")


LOADED = loaded()


def stamped_run(payload: dict, key: str, *args) -> dict:
    """run_seed(*args), with the commit, the machine and the wall seconds of this run appended to the seed's
    runs (a development seed runs twice: its rows, then the combined rows once the rule has picked)."""
    t0 = time.perf_counter()
    rows = run_seed(*args)
    payload["runs"].setdefault(key, []).append({"commit": LOADED, "machine": versions(),
                                                "wall_s": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=SETTINGS, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", help="development seeds only, or the declared ones "
                    f"[default: {' '.join(map(str, DEV_SEEDS + TEST_SEEDS))}]")
    ap.add_argument("--quick", action="store_true", help="the quick demos (tests; the numbers mean nothing)")
    ap.add_argument("--out", default="demo_out/equal-seconds")
    ap.add_argument("--json", help="[benchmarks/results/bench_demo_equal_seconds-<setting>-cpu.json]")
    a = ap.parse_args(argv)
    path = Path(a.json or f"benchmarks/results/bench_demo_equal_seconds-{a.setting}-cpu.json")
    old = read_json(path)
    if old and (old.get("grid") != json.loads(json.dumps(GRID)) or old.get("quick") != a.quick):
        print(f"{path} holds another grid: move it away to run this one", file=sys.stderr)
        return 2
    done = old.get("seeds", {})
    seeds = a.seeds or list(DEV_SEEDS + TEST_SEEDS)
    dev = [s for s in seeds if s in DEV_SEEDS]
    kind = SETTINGS[a.setting][0]
    picked = old.get("rule")  # fixed once, on the development seeds; every later write carries it
    payload = {"setting": a.setting, "quick": a.quick, "grid": GRID, "seeds": done,
               "runs": old.get("runs", {})} | ({"rule": picked} if picked else {})
    for s in dev:
        key = str(s)
        if key not in done or (picked and not any("+ select" in r for r in done[key])):
            print(f"--- {a.setting} seed {s} (development)", flush=True)
            done[key] = stamped_run(payload, key, a.setting, s, a.quick, Path(a.out),
                                    picked and tuple(picked["best_select"]))
            write_json(path, payload)
    if set(DEV_SEEDS) <= {int(s) for s in done} and picked is None:
        picked = rule({s: done[str(s)] for s in DEV_SEEDS}, kind)
        payload["rule"] = picked
        for s in DEV_SEEDS:  # the combined rows, now that the selection is known (cached samples)
            done[str(s)] = stamped_run(payload, str(s), a.setting, s, a.quick, Path(a.out),
                                       tuple(picked["best_select"]))
        write_json(path, payload)
    for s in (s for s in seeds if s in TEST_SEEDS):
        if picked is None:
            print("the test seeds run once the development seeds have picked", file=sys.stderr)
            return 2
        if str(s) not in done:
            print(f"--- {a.setting} seed {s} (test)", flush=True)
            done[str(s)] = stamped_run(payload, str(s), a.setting, s, a.quick, Path(a.out),
                                       tuple(picked["best_select"]))
            write_json(path, payload)
    test = {s: done[str(s)] for s in TEST_SEEDS if str(s) in done}
    if picked and test:
        payload["paired"] = paired(test, picked["feedback"], picked["rival"], Y[kind])
        payload["paired_at_b"] = paired(test, picked["feedback"], "unguided x1", Y[kind])  # the same images
        write_json(path, payload)
    shown = test or {s: done[str(s)] for s in DEV_SEEDS if str(s) in done}
    if shown:
        which = "test" if test else "development"
        print(f"{a.setting}, {which} seeds {', '.join(map(str, shown))} (mean +- std):")
        print(summary(shown, Y[kind]))
        if picked:
            print(f"the rule (development seeds): {picked}")
        for key, other in (("paired", picked and picked["rival"]), ("paired_at_b", "unguided x1")):
            if payload.get(key):
                print(f"paired, {picked['feedback']} minus {other}, test seeds: " + ", ".join(
                    f"{k} {d['mean']:+.1f} +- {d['std']:.1f} ({d['above']} above, {d['equal']} equal, "
                    f"{d['below']} below)" for k, d in payload[key].items()))
        metric = "minority" if kind == "groups" else "few"
        equal_seconds(path.with_suffix(".png"), shown, metric, f"{a.setting}: {which} seeds "
                      f"{', '.join(map(str, shown))}", picked)
        print(f"wrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
