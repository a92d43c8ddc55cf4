"""Does feedback help? The digits demos over several seeds, mean and spread.

    python benchmarks/experiments/quality.py [--setting long-tail|groups] [--seeds 0 1 2] [--quick]

long-tail: each seed changes the split (which digits are rare), the generator's training and samples, and
the classifiers. Reports mean and standard deviation over the seeds of few-shot (and overall) test accuracy
for real-only, no feedback and each criterion, and the per-variant sample fidelity.

groups: for each generator color prior (matched: 90% majority as the classifier's data; milder: 55%) and
variant, mean and standard deviation over the seeds of average, worst-group and minority-group accuracy, the
oracle's fidelity, the share of minority-color samples, of samples in the color the real-only classifier
reads worst, between palette colors and without a stroke, and seconds per image against no feedback (same
run). The entropy feedback-scale curve (0 .. 0.3, matched prior, over --curve-seeds) goes to a JSON and a PNG.

Whatever comes out is reported; nothing is tuned here. Trained models and samples are cached per seed under
--out (a rerun is fast; the seconds per image then are those of the run that generated the samples).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fgds_engine.demo import DemoConfig, charts
from fgds_engine.demo.experiment import mean_std, over_seeds, sample_metric, write_json

GROUP_METRICS = ("overall", "worst_group", "minority", "majority")
SAMPLE_METRICS = ("fidelity", "minority_share", "nearest_minority_share", "worst_color_share",
                  "between_share", "empty_share", "time_vs_no_feedback")
CURVE = ("minority_share", "nearest_minority_share", "fidelity", "worst_group", "minority")


def summed_histograms(runs: dict, prior: str, seeds: list[int], variant: str, which: str) -> dict:
    """Per digit, the stroke-color histogram of a variant's samples summed over the seeds."""
    out = {}
    for s in seeds:
        samples = runs[prior, s]["samples"][variant]
        hist = samples["nearest"]["histogram"] if which == "nearest" else samples["histogram"]
        for d, h in hist.items():
            row = out.setdefault(int(d), dict.fromkeys(h, 0))
            for k, n in h.items():
                row[k] += n
    return out


def long_tail(args) -> None:
    runs = {}
    for s, metrics in over_seeds(args.seeds, "", lambda s: Path(args.out) / f"seed{s}",
                                 lambda s: DemoConfig.quick(s) if args.quick else DemoConfig(seed=s)):
        runs[s] = metrics
    variants = list(runs[args.seeds[0]]["accuracy"])
    summary = {}
    for v in variants:
        row = {}
        for key in ("few", "medium", "overall"):
            row[key] = mean_std([100 * runs[s]["accuracy"][v][key] for s in args.seeds
                                 if runs[s]["accuracy"][v][key] is not None])
        if v in runs[args.seeds[0]]["samples"]:
            row["fidelity"] = statistics.mean(100 * runs[s]["samples"][v]["fidelity"] for s in args.seeds)
        summary[v] = row
    print(f"\n{len(args.seeds)} seeds {args.seeds}; test accuracy %, mean +- std over seeds")
    print(f"{'':14} {'few':>13} {'medium':>13} {'overall':>13} {'fidelity':>9}")
    for v, row in summary.items():
        cells = " ".join(f"{row[k]['mean']:6.1f} +- {row[k]['std']:3.1f}"
                         for k in ("few", "medium", "overall"))
        fid = f"{row['fidelity']:8.1f}%" if "fidelity" in row else f"{'-':>9}"
        print(f"{v:14} {cells} {fid}")
    counts = {s: runs[s]["train_counts"] for s in runs}
    write_json(args.json or "benchmarks/results/bench_demo_quality-cpu.json",
          {"seeds": args.seeds, "quick": args.quick, "summary": summary, "train_counts": counts,
           "seconds": {s: runs[s]["seconds"] for s in runs}})


def groups(args) -> None:
    out = Path(args.out)
    runs = {}  # (prior, seed) -> metrics
    for prior in args.priors:
        def config(s, prior=prior):
            scales = tuple(args.scales) if prior == "matched" and s in args.curve_seeds else ()
            return (DemoConfig.quick(s, "groups", color_prior=prior, scales=scales) if args.quick
                    else DemoConfig.groups(s, prior, scales=scales))

        for s, metrics in over_seeds(args.seeds, f"prior {prior}, ", lambda s, p=prior: out / f"seed{s}" / p,
                                     config):
            runs[prior, s] = metrics
    summary = {}
    for prior in args.priors:
        summary[prior] = {}
        for v in runs[prior, args.seeds[0]]["accuracy"]:
            row = {k: mean_std([100 * runs[prior, s]["accuracy"][v][k] for s in args.seeds])
                   for k in GROUP_METRICS}
            if v in runs[prior, args.seeds[0]]["samples"]:
                for k in SAMPLE_METRICS:
                    scale = 1 if k == "time_vs_no_feedback" else 100
                    vals = [sample_metric(runs[prior, s]["samples"][v], k) for s in args.seeds]
                    row[k] = mean_std([None if x is None else scale * x for x in vals])
                row["histogram"] = summed_histograms(runs, prior, args.seeds, v, "strict")
                row["nearest_histogram"] = summed_histograms(runs, prior, args.seeds, v, "nearest")
            summary[prior][v] = row
    for prior in args.priors:
        print(f"\nprior {prior}; {len(args.seeds)} seeds {args.seeds}; %, mean +- std over seeds")
        print(table(summary[prior]))
    curve = scale_curve(runs, args) if "matched" in args.priors and args.curve_seeds else None
    result = {"seeds": args.seeds, "priors": args.priors, "quick": args.quick, "summary": summary,
              "curve": curve,
              "per_seed": {f"{p}/{s}": {"accuracy": m["accuracy"], "samples": m["samples"],
                                        "real_only_worst_color": m["real_only_worst_color"],
                                        "train_groups": m["train_groups"], "seconds": m["seconds"]}
                           for (p, s), m in runs.items()}}
    path = write_json(args.json or "benchmarks/results/bench_demo_quality-groups-cpu.json", result)
    if curve:
        png = path.with_name(path.stem + "-scale-curve.png")
        charts.scale_curve(png, curve)
        print(f"wrote {png}")
    s0 = args.seeds[0]
    panel_variants = [v for v in PANEL if v in runs.get(("matched", s0), {}).get("samples", {})]
    if panel_variants:
        png = path.with_name(path.stem + "-samples.png")
        sample_panel({v: out / f"seed{s0}" / "matched" / f"samples-{v.replace(' ', '-')}.png"
                      for v in panel_variants}, png)
        print(f"wrote {png}")


PANEL = ("no feedback", "entropy", "loss", "hardness", "entropy 0.3")


def sample_panel(grids: dict, path: Path, columns: int = 5) -> None:
    """The first ``columns`` samples of every digit from each variant's samples-*.png (the demo's 4x grids,
    tiles of 64 px and 2 px padding), at half size, side by side under their names."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, p in grids.items():
        with Image.open(p) as im:
            crop = im.crop((0, 0, 2 + columns * 66, im.height)).convert("RGB")
        tiles.append((name, crop.resize((crop.width // 2, crop.height // 2), Image.NEAREST)))
    w = sum(t.width for _, t in tiles) + 10 * (len(tiles) - 1)
    canvas = Image.new("RGB", (w, tiles[0][1].height + 18), "white")
    d = ImageDraw.Draw(canvas)
    x = 0
    for name, t in tiles:
        d.text((x + 2, 2), name, fill="black")
        canvas.paste(t, (x, 18))
        x += t.width + 10
    canvas.save(path)


def table(rows: dict) -> str:
    cell = lambda r, k: f"{'-':>13}" if k not in r or r[k]["mean"] is None else (  # noqa: E731
        f"{r[k]['mean']:6.2f} +- {r[k]['std']:4.2f}" if k == "time_vs_no_feedback"
        else f"{r[k]['mean']:6.1f} +- {r[k]['std']:4.1f}")
    keys = GROUP_METRICS[:3] + ("fidelity", "minority_share", "nearest_minority_share", "worst_color_share",
                                "between_share", "time_vs_no_feedback")
    heads = ("overall", "worst group", "minority grp", "fidelity", "minority smp", "min. nearest",
             "in worst col", "between", "time vs none")
    lines = [f"{'':14}" + "".join(f" {h:>14}" for h in heads)]
    for v, r in rows.items():
        lines.append(f"{v:14}" + "".join(f" {cell(r, k):>14}" for k in keys))
    return "\n".join(lines)


def scale_curve(runs: dict, args) -> dict:
    """Entropy feedback scale -> minority share, fidelity, worst-group and minority accuracy (matched prior),
    mean and std over the curve seeds."""
    names = {0.0: "no feedback"}
    base = DemoConfig.groups()
    for sc in sorted({base.feedback_scale, *args.scales}):
        names[sc] = "entropy" if sc == base.feedback_scale else f"entropy {sc:g}"
    points = []
    for sc, v in sorted(names.items()):
        point = {"scale": sc, "variant": v}
        for k in CURVE:
            point[k] = mean_std([100 * (runs["matched", s]["accuracy"][v][k] if k in GROUP_METRICS
                                        else sample_metric(runs["matched", s]["samples"][v], k))
                                 for s in args.curve_seeds])
        points.append(point)
    print(f"\nentropy feedback-scale curve, matched prior, seeds {args.curve_seeds} (%, mean +- std)")
    print(f"{'scale':>6}" + "".join(f" {k:>22}" for k in CURVE))
    for p in points:
        print(f"{p['scale']:6g}" + "".join(f" {p[k]['mean']:14.1f} +- {p[k]['std']:4.1f}" for k in CURVE))
    return {"seeds": args.curve_seeds, "prior": "matched", "criterion": "entropy", "points": points}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("long-tail", "groups"), default="long-tail", help="[long-tail]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    ap.add_argument("--out", help="cache and outputs, one folder per seed [demo_out/quality, "
                    "demo_out/quality-groups]")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    ap.add_argument("--json", help="results [benchmarks/results/bench_demo_quality-cpu.json, "
                    "benchmarks/results/bench_demo_quality-groups-cpu.json]")
    ap.add_argument("--priors", nargs="+", choices=("matched", "milder"), default=["matched", "milder"],
                    help="groups: the generator's color priors [matched milder]")
    ap.add_argument("--scales", type=float, nargs="*", default=[0.01, 0.1, 0.3],
                    help="groups: entropy scales of the curve besides 0 and the demo's 0.03 [0.01 0.1 0.3]")
    ap.add_argument("--curve-seeds", type=int, nargs="*",
                    help="groups: seeds the scale curve runs on [all of --seeds]")
    args = ap.parse_args(argv)
    if args.setting == "groups":
        args.out = args.out or "demo_out/quality-groups"
        args.curve_seeds = args.seeds if args.curve_seeds is None else args.curve_seeds
        if not set(args.curve_seeds) <= set(args.seeds):
            ap.error("--curve-seeds must be among --seeds")
        groups(args)
    else:
        args.out = args.out or "demo_out/quality"
        long_tail(args)


if __name__ == "__main__":
    main()
