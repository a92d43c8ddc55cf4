"""The budget curve: test accuracy against synthetic images per class and against generation seconds,
unguided and with loss and entropy feedback (the paper's settings otherwise), over seeds; and the paper's
number: the budget at which a variant reaches unguided synthesis's accuracy at the full budget.

    python benchmarks/experiments/budget.py [--setting long-tail|groups] [--seeds ...] [--quick]

long-tail: caps 1, 2, 5, 10, 20 synthetic images per class and "fill" (every class filled to the head's
count), seeds 0-4; few-shot accuracy (the paper's measure) and overall. groups: caps 5, 10, 20 and the demo's
60, the milder color prior (where synthetic images lift the groups), seeds 15-19; minority-group accuracy
(less noisy than worst-group), the mean of the 5 worst groups, worst-group (the paper's) and overall.

Every cap's synthetic set is the first k images of every class of the full budget's samples: the jobs and
seeds ``budget_cap`` = k keeps, not generated again (``DemoConfig.budget_caps``). A point's generation seconds
are its images times the variant's seconds per image (the production call, timed interleaved with the other
variants in the same run). Real only is the point at 0 images.

The budget equivalence, per seed: the images (and seconds) at which the variant's curve, linear between
measured points, first reaches unguided synthesis's accuracy at the full budget on that seed, as a fraction of
that full budget's images (seconds); "not reached" if it stays below. It is given for unguided synthesis
too: a feedback variant saves images only where it reaches the target before unguided synthesis does.

Runs are the demos' (cached under --out: the quality benches' folders, shared with them); each seed's row is
written to the JSON as it comes, so an interrupted run resumes; a JSON of another grid is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fgds_engine.bench import commit
from fgds_engine.demo import DemoConfig, run_demo
from fgds_engine.demo.charts import budget_curves
from fgds_engine.demo.experiment import mean_std, read_json, write_json

VARIANTS = ((None, 0.0, None), ("loss", 0.03, None), ("entropy", 0.03, None))  # recipes: the paper's settings
SETTINGS = {
    "long-tail": {"caps": (1, 2, 5, 10, 20), "seeds": (0, 1, 2, 3, 4), "metrics": ("few", "overall"),
                  "out": "demo_out/quality", "quick_caps": (1, 3)},
    "groups": {"caps": (5, 10, 20), "seeds": (15, 16, 17, 18, 19),
               "metrics": ("minority", "worst5", "worst_group", "overall"), "out": "demo_out/quality-groups",
               "quick_caps": (2, 4)},
}


def config(setting: str, seed: int, prior: str, caps, quick: bool) -> DemoConfig:
    kw = {"recipes": VARIANTS, "budget_caps": tuple(caps)}
    if setting == "groups":
        return (DemoConfig.quick(seed, "groups", color_prior=prior, **kw) if quick
                else DemoConfig.groups(seed, prior, **kw))
    return DemoConfig.quick(seed, **kw) if quick else DemoConfig(seed=seed, **kw)


def seed_row(metrics: dict, keys) -> dict:
    """One seed's curves: per variant, per point (real only at 0 images, each cap, fill), the metrics
    (fractions), the images, the generation seconds and, for groups, the bootstrap intervals."""
    row = {}
    real = metrics["accuracy"]["real only"]
    for v, points in metrics["budget"].items():
        per_image = metrics["samples"][v]["seconds_per_image"]
        row[v] = {"0": {k: real[k] for k in keys} | {"images": 0, "seconds": 0.0}}
        for cap, m in points.items():
            row[v][cap] = {k: m[k] for k in keys} | {"images": m["images"],
                                                     "seconds": m["images"] * per_image}
            if "intervals" in m:
                row[v][cap]["intervals"] = m["intervals"]
    return row


def reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest x at which the curve through ``points`` (x ascending, linear between them) reaches
    ``target``; None if it never does."""
    if points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
        # y0 < target here: below it so far
    return None


def equivalence(rows: dict, variants: list[str], metric: str) -> dict:
    """Per variant: per seed, the fraction of unguided synthesis's full-budget images and seconds at which
    the variant reaches its accuracy (None: not reached); on how many seeds it does; mean +- std of those."""
    out = {}
    for v in variants:
        per = {"images": [], "seconds": []}
        for row in rows.values():
            target_point = row["no feedback"]["fill"]
            pts = sorted(row[v].values(), key=lambda p: p["images"])
            for unit in per:
                x = reach([(p[unit], p[metric]) for p in pts], target_point[metric])
                per[unit].append(None if x is None else x / target_point[unit])
        out[v] = {}
        for unit, vals in per.items():
            got = [x for x in vals if x is not None]
            out[v][unit] = {"per_seed": vals, "reached": len(got), "seeds": len(vals),
                            "mean": statistics.mean(got) if got else None,
                            "std": statistics.stdev(got) if len(got) > 1 else (0.0 if got else None)}
    return out


def summarize(rows: dict, keys) -> dict:
    """Per variant and point: mean +- std over seeds of each metric (points), the images and seconds."""
    first = next(iter(rows.values()))
    out = {}
    for v, points in first.items():
        out[v] = {}
        for cap in points:
            vals = [rows[s][v][cap] for s in rows]
            out[v][cap] = {k: mean_std([100 * p[k] for p in vals]) for k in keys}
            out[v][cap]["images"] = statistics.mean(p["images"] for p in vals)
            out[v][cap]["seconds"] = statistics.mean(p["seconds"] for p in vals)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=tuple(SETTINGS), default="long-tail", help="[long-tail]")
    ap.add_argument("--seeds", type=int, nargs="+", help="[long-tail: 0-4; groups: 15-19]")
    ap.add_argument("--prior", choices=("milder", "matched"), default="milder",
                    help="groups: the generator's color prior [milder]")
    ap.add_argument("--caps", type=int, nargs="+", help="synthetic images per class besides the full budget "
                    "[long-tail: 1 2 5 10 20; groups: 5 10 20]")
    ap.add_argument("--out", help="the demos' caches [demo_out/quality, demo_out/quality-groups]")
    ap.add_argument("--json", help="[benchmarks/results/bench_demo_budget-<setting>-cpu.json]")
    ap.add_argument("--quick", action="store_true", help="the quick demo, caps 1 3 (long-tail) or 2 4 "
                    "(groups) (a smoke test; numbers mean nothing)")
    args = ap.parse_args(argv)
    st = SETTINGS[args.setting]
    seeds = args.seeds or list(st["seeds"])
    caps = tuple(args.caps or (st["quick_caps"] if args.quick else st["caps"]))
    out = Path(args.out or st["out"])
    path = Path(args.json or f"benchmarks/results/bench_demo_budget-{args.setting}-cpu.json")
    prior = args.prior if args.setting == "groups" else None
    probe = config(args.setting, seeds[0], args.prior, caps, args.quick)
    grid = json.loads(json.dumps({"setting": args.setting, "prior": prior, "caps": caps,
                                  "variants": [v.name for v in probe.variants()], "quick": args.quick,
                                  "config": {k: v for k, v in probe.__dict__.items() if k != "seed"}}))
    data = read_json(path)
    if data and data["grid"] != grid:
        raise SystemExit(f"{path} holds another grid: move it away to rerun (its setting, caps, variants "
                         f"or configuration differ)")
    data = data or {"grid": grid, "per_seed": {}}
    for s in seeds:
        if str(s) in data["per_seed"]:
            continue
        print(f"--- {args.setting} seed {s}", flush=True)
        folder = out / f"seed{s}" / prior if prior else out / f"seed{s}"
        metrics = run_demo(folder, config=config(args.setting, s, args.prior, caps, args.quick),
                           progress=False, log=lambda *a: None)
        print(f"    {metrics['seconds']:.0f} s", flush=True)
        data["per_seed"][str(s)] = seed_row(metrics, st["metrics"])
        data["commits"] = {**data.get("commits", {}), str(s): commit()}
        write_json(path, data)
    rows = {s: data["per_seed"][str(s)] for s in seeds}
    data["seeds"] = seeds
    data["summary"] = summarize(rows, st["metrics"])
    data["equivalence"] = {k: equivalence(rows, grid["variants"], k) for k in st["metrics"]}
    write_json(path, data)
    print(report(data, st["metrics"]))
    png = path.with_name(path.stem + "-curve.png")
    budget_curves(png, data, st["metrics"][:2])
    print(f"wrote {path}, {png}")


def report(data: dict, keys) -> str:
    lines = [f"{data['grid']['setting']}, seeds {data['seeds']}: accuracy %, mean +- std over seeds"]
    head = f"{'':14} {'cap':>5} {'images':>7} {'seconds':>8}" + "".join(f" {k:>14}" for k in keys)
    lines.append(head)
    for v, points in data["summary"].items():
        for cap, p in points.items():
            cells = "".join(f" {p[k]['mean']:6.1f} +- {p[k]['std']:4.1f}" for k in keys)
            lines.append(f"{v:14} {cap:>5} {p['images']:7.0f} {p['seconds']:8.1f}{cells}")
    lines.append("\nbudget at which each variant reaches unguided synthesis's full-budget accuracy, as a "
                 "fraction of its images / seconds (mean +- std over the seeds that reach it; reached / "
                 "seeds)")
    for k in keys:
        for v, e in data["equivalence"][k].items():
            cells = []
            for unit in ("images", "seconds"):
                u = e[unit]
                value = "not reached" if u["mean"] is None else f"{u['mean']:.2f} +- {u['std']:.2f}"
                cells.append(f"{unit} {value} ({u['reached']}/{u['seeds']})")
            lines.append(f"{k:12} {v:14} " + "   ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
