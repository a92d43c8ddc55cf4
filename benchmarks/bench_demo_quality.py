"""Does feedback help the few-shot classes? The digits demo over several seeds, mean and spread.

    python benchmarks/bench_demo_quality.py [--seeds 0 1 2] [--out demo_out/quality] [--quick]

Each seed changes the split (which digits are rare), the generator's training and samples, and the
classifiers. Reports mean and standard deviation over the seeds of few-shot (and overall) test accuracy for
real-only, no feedback and each criterion, and the per-variant sample fidelity. Whatever comes out is
reported; nothing is tuned here. Trained models are cached per seed under --out (a rerun is fast).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import commit, versions

from fgds_engine.demo import DemoConfig, run_demo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    ap.add_argument("--out", default="demo_out/quality", help="cache and outputs, one folder per seed")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    ap.add_argument("--json", default="benchmarks/results/bench_demo_quality-cpu.json")
    args = ap.parse_args(argv)
    runs = {}
    for s in args.seeds:
        cfg = DemoConfig.quick(s) if args.quick else DemoConfig(seed=s)
        print(f"--- seed {s}")
        runs[s] = run_demo(Path(args.out) / f"seed{s}", config=cfg, progress=False, log=lambda *a: None)
    variants = list(runs[args.seeds[0]]["accuracy"])
    summary = {}
    for v in variants:
        row = {}
        for key in ("few", "medium", "overall"):
            vals = [100 * runs[s]["accuracy"][v][key] for s in args.seeds
                    if runs[s]["accuracy"][v][key] is not None]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[key] = {"mean": statistics.mean(vals), "std": std, "values": vals}
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
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {s: runs[s]["train_counts"] for s in runs}
    path.write_text(json.dumps({**versions(), "commit": commit(), "seeds": args.seeds, "quick": args.quick,
                                "summary": summary, "train_counts": counts,
                                "seconds": {s: runs[s]["seconds"] for s in runs}}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
