"""Quality per second at fewer steps: the digits demos under other schedulers, over seeds, mean and spread.

    python benchmarks/bench_demo_schedulers.py [--seeds 0 1 2] [--quick] [--settings long-tail groups]

Variants (fixed before any result was looked at; README, "Schedulers"): DDIM 25 steps (today) unguided, with
entropy feedback (auto form: shift, the demo's) and in the score form; DPM-Solver++ 2M at 10 and 15 steps,
UniPC at 10, Euler at 20, each unguided and with entropy feedback (auto form: score for the multistep
solvers, shift for Euler). Feedback keeps its scale (0.03 of ||x_t|| per feedback step) and its number of
steps (5, every (n/5)-th step from the first: ``DemoConfig.feedback_every_for``). Nothing is tuned per
scheduler. Long-tail: few-shot / overall accuracy; groups (matched prior): worst-group / minority / overall
accuracy; both: the oracle's fidelity and seconds per image (the production sampling call, fastest of
interleaved rounds in one process, 2-core CPU). The JSON is written after each seed (a cut run keeps what
it finished); ``--settings groups`` replaces the groups block and keeps the long-tail one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_demo_quality import mean_std, write
from common import commit, versions

from fgds_engine.demo import DemoConfig, run_demo

GRID = (("dpmpp-2m", 10), ("dpmpp-2m", 15), ("unipc", 10), ("euler", 20))
METRICS = {"long-tail": ("few", "overall"), "groups": ("worst_group", "minority", "overall")}


def run_setting(setting: str, args, done=lambda block: None) -> dict:
    """The setting's grid over the seeds; ``done(block)`` after each seed with the block so far."""
    runs = {}
    for s in args.seeds:
        if setting == "groups":
            cfg = (DemoConfig.quick(s, "groups", solvers=GRID) if args.quick
                   else DemoConfig.groups(s, "matched", solvers=GRID))
        else:
            cfg = DemoConfig.quick(s, solvers=GRID) if args.quick else DemoConfig(seed=s, solvers=GRID)
        print(f"--- {setting}, seed {s}", flush=True)
        runs[s] = run_demo(Path(args.out) / setting / f"seed{s}", config=cfg, progress=False,
                           log=lambda *a: None)
        print(f"    {runs[s]['seconds']:.0f} s", flush=True)
        block = {"seeds_done": sorted(runs),
                 "summary": summarise(runs, sorted(runs), METRICS[setting], time_ratio="time_vs_ddim25"),
                 "per_seed": per_seed(runs)}
        done(block)
    print(table(block["summary"], METRICS[setting] + ("fidelity", "seconds_per_image", "time_vs_ddim25")))
    return block


def summarise(runs: dict, seeds, metrics: tuple, *, time_ratio: str | None = None) -> dict:
    """Mean and std over seeds per variant (accuracies and fidelity in %, seconds per image; with
    ``time_ratio``, each variant's time against the unguided run under that key), "real only" first."""
    summary = {}
    for v in runs[seeds[0]]["samples"]:
        row = {k: mean_std([100 * runs[s]["accuracy"][v][k] for s in seeds
                            if runs[s]["accuracy"][v][k] is not None]) for k in metrics}
        row["fidelity"] = mean_std([100 * runs[s]["samples"][v]["fidelity"] for s in seeds])
        row["seconds_per_image"] = mean_std([runs[s]["samples"][v]["seconds_per_image"] for s in seeds])
        if time_ratio:
            row[time_ratio] = mean_std([runs[s]["samples"][v]["time_vs_no_feedback"] for s in seeds])
        summary[v] = row
    return {"real only": {k: mean_std([100 * runs[s]["accuracy"]["real only"][k] for s in seeds
                                       if runs[s]["accuracy"]["real only"][k] is not None])
                          for k in metrics}} | summary


def per_seed(runs: dict) -> dict:
    """What each seed's run measured, for the JSON."""
    return {str(s): {"accuracy": m["accuracy"], "samples": m["samples"], "seconds": m["seconds"]}
            for s, m in runs.items()}


def table(rows: dict, keys: tuple) -> str:
    def cell(r, k):
        if k not in r or r[k]["mean"] is None:
            return "-"
        if k == "seconds_per_image":
            return f"{1000 * r[k]['mean']:.1f} ms"
        if k.startswith("time_vs"):
            return f"{r[k]['mean']:.2f}x"
        return f"{r[k]['mean']:.1f} +- {r[k]['std']:.1f}"

    lines = [f"{'':22}" + "".join(f" {k:>16}" for k in keys)]
    lines += [f"{v:22}" + "".join(f" {cell(r, k):>16}" for k in keys) for v, r in rows.items()]
    return "\n".join(lines)


def grid_arguments(argv, description: str, name: str, settings: tuple[str, ...]):
    """The arguments every demo-grid script takes: settings, seeds, the cache folder, --quick, the JSON."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--settings", nargs="+", choices=("long-tail", "groups"), default=list(settings),
                    help=f"[{' '.join(settings)}]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    ap.add_argument("--out", default=f"demo_out/{name}", help=f"cache and outputs [demo_out/{name}]")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    path = f"benchmarks/results/bench_demo_{name}-cpu.json"
    ap.add_argument("--json", default=path, help=f"[{path}]")
    return ap.parse_args(argv)


def merged(old: dict, payload: dict, settings) -> dict:
    """``payload`` (this run's settings, each a block) over the JSON as it was: the settings this run did not
    touch keep their blocks when the file holds the same seeds and budgets (``--settings groups`` re-runs one
    setting and leaves the other's results, each block with its own commit and machine)."""
    same = all(old.get(k) == payload.get(k) for k in ("seeds", "quick"))
    before = {k: old[k] for k in ("commit", "note") if k in old}  # a block from before blocks were stamped
    kept = {k: before | old[k] for k in ("long-tail", "groups") if same and k in old and k not in settings}
    return payload | kept


def write_grid(path: str, payload: dict, settings) -> None:
    """Write the grid's JSON (``merged`` with the file as it is now)."""
    old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    write(path, merged(old, payload, settings))


def stamped(block: dict) -> dict:
    """A setting's block with the commit and the machine it ran on (settings may run at different commits),
    as the generator bench and each demo's metrics.json record them."""
    return block | {"commit": commit(), "machine": versions()}


def main(argv=None):
    args = grid_arguments(argv, __doc__.splitlines()[0], "schedulers", ("long-tail", "groups"))
    head = {"seeds": args.seeds, "quick": args.quick, "grid": [list(g) for g in GRID],
            "feedback_rule": "5 feedback steps, every (n/5)-th from the first; scale 0.03; auto form"}
    results = {}
    for setting in args.settings:
        def done(block, setting=setting):
            results[setting] = stamped(block)
            write_grid(args.json, head | results, args.settings)
        run_setting(setting, args, done)


if __name__ == "__main__":
    main()
