"""Coverage beyond the prior: interval CFG, CADS and particle repulsion on the digits demos, over seeds.

    python benchmarks/experiments/coverage_terms.py [--seeds 0 1 2] [--settings groups long-tail] [--quick]

The grid was fixed in the README ("Coverage beyond the prior") before any result was looked at
(``DemoConfig.coverage_variants``): CFG 1.5 (the demo's), 1.0 and 3.0; interval CFG 1.5 and 3.0 at the
published (0.28, 5.42]; CADS at its published defaults (0.6, 0.9, noise 0.25, rescale 1); particle repulsion
on the latents at feedback's per-step push (0.03 of ||x_t||) on feedback's 5 steps; each unguided and with
entropy feedback (0.03, every 5th of 25 DDIM steps). Groups: the matched prior. Reported per variant, mean
+- std over the seeds: worst-group / minority / overall accuracy (groups), few-shot / overall (long-tail),
fidelity, the minority-color share of the samples (strict and nearest; groups) and seconds per image (the
production sampling call, fastest of interleaved rounds in one process). Each seed's metrics are written as
soon as it finishes (``--json``), so a cut run keeps what it finished.
"""

from __future__ import annotations

from pathlib import Path

from fgds_engine.demo import DemoConfig
from fgds_engine.demo.experiment import (
    grid_arguments,
    mean_std,
    over_seeds,
    sample_metric,
    stamped,
    table,
    write_grid,
)

METRICS = {"groups": ("worst_group", "minority", "overall"), "long-tail": ("few", "overall")}
SAMPLES = {"groups": ("fidelity", "minority_share", "nearest_minority_share", "seconds_per_image",
                      "time_vs_no_feedback"),
           "long-tail": ("fidelity", "seconds_per_image", "time_vs_no_feedback")}
UNSCALED = ("seconds_per_image", "time_vs_no_feedback")  # not percentages


def config(setting: str, seed: int, quick: bool) -> DemoConfig:
    if setting == "groups":
        return (DemoConfig.quick(seed, "groups", coverage=True) if quick
                else DemoConfig.groups(seed, "matched", coverage=True))
    return DemoConfig.quick(seed, coverage=True) if quick else DemoConfig(seed=seed, coverage=True)


def summary(setting: str, runs: dict) -> dict:
    seeds = sorted(runs)
    first = runs[seeds[0]]
    out = {"real only": {k: mean_std([100 * runs[s]["accuracy"]["real only"][k] for s in seeds
                                      if runs[s]["accuracy"]["real only"][k] is not None])
                         for k in METRICS[setting]}}
    for v in first["samples"]:
        row = {k: mean_std([100 * runs[s]["accuracy"][v][k] for s in seeds
                            if runs[s]["accuracy"][v][k] is not None]) for k in METRICS[setting]}
        for k in SAMPLES[setting]:
            scale = 1 if k in UNSCALED else 100
            row[k] = mean_std([scale * sample_metric(runs[s]["samples"][v], k) for s in seeds])
        out[v] = row
    return out


def main(argv=None):
    args = grid_arguments(argv, __doc__.splitlines()[0], "coverage", ("groups", "long-tail"))
    results = {}
    for setting in args.settings:
        runs = {}
        for s, metrics in over_seeds(args.seeds, f"{setting}, ",
                                     lambda s, st=setting: Path(args.out) / st / f"seed{s}",
                                     lambda s, st=setting: config(st, s, args.quick)):
            runs[s] = metrics
            rows = summary(setting, runs)
            results[setting] = stamped({"seeds_done": sorted(runs), "summary": rows, "per_seed": {
                str(k): {"accuracy": m["accuracy"], "samples": m["samples"], "seconds": m["seconds"]}
                for k, m in runs.items()}})
            write_grid(args.json, {"seeds": args.seeds, "quick": args.quick,
                                   "grid": [v.key() for v in config(setting, 0, args.quick).variants()],
                                   **results}, args.settings)
        print(table(results[setting]["summary"], METRICS[setting] + SAMPLES[setting]), flush=True)


if __name__ == "__main__":
    main()
