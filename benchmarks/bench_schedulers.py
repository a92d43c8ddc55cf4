"""One row per scheduler: the per-sample reference and the engine under each, same preset, steps and batches.

    python benchmarks/bench_schedulers.py [--preset tiny] [--schedulers ddim dpmpp-2m unipc euler euler-a]

For each scheduler, ``fgds bench``'s run (``bench.run_preset(..., scheduler=NAME)``): the per-sample reference
loop under that scheduler at batch 1 and the engine guided and unguided at each batch, in one process, so the
ratio is honest for every scheduler. DDIM runs the fused step; the others their own ``step`` eagerly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fgds_engine.bench import commit, run_preset, versions


def headline(result: dict) -> dict:
    run = result["runs"][0]
    rows = {(r["impl"], r.get("batch")): r for r in run["rows"]}
    ref = rows.get(("reference (demo loop)", 1), {}).get("per_sample_s")
    out = {"scheduler": run.get("scheduler"), "feedback_mode": run.get("feedback_mode"),
           "reference_s_per_sample": ref}
    for (impl, b), r in rows.items():
        if impl.startswith("engine") and r.get("per_sample_s") is not None:
            key = f"{'unguided' if 'no feedback' in impl else 'engine'}_b{b}"
            out[f"{key}_s_per_sample"] = r["per_sample_s"]
            out[f"{key}_vs_reference"] = None if ref is None else ref / r["per_sample_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="[tiny]")
    ap.add_argument("--schedulers", nargs="+", default=["ddim", "dpmpp-2m", "unipc", "euler", "euler-a"],
                    help="[ddim dpmpp-2m unipc euler euler-a]")
    ap.add_argument("--steps", type=int, default=20, help="[20]")
    ap.add_argument("--feedback-every", type=int, default=4, help="[4: 5 feedback steps of 20]")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="[1 8]")
    ap.add_argument("--repeats", type=int, default=3, help="[3]")
    ap.add_argument("--json", default=None, help="[benchmarks/results/bench_schedulers-<preset>-cpu.json]")
    args = ap.parse_args(argv)
    results, rows = {}, {}
    for name in args.schedulers:
        print(f"--- {name}", flush=True)
        results[name] = run_preset(args.preset, batches=tuple(args.batches), steps=args.steps,
                                   feedback_every=(args.feedback_every,), repeats=args.repeats,
                                   device="cpu", scheduler=name, log=lambda *a: None)
        rows[name] = headline(results[name])
        print(json.dumps(rows[name]), flush=True)
    b = max(args.batches)
    print(f"\n{'scheduler':12} {'reference':>10} {'engine b1':>10} {f'engine b{b}':>10} {'vs ref':>7} "
          f"{f'unguided b{b}':>12}")
    for name, r in rows.items():
        print(f"{name:12} {r['reference_s_per_sample']:10.3f} {r.get('engine_b1_s_per_sample', 0):10.3f} "
              f"{r.get(f'engine_b{b}_s_per_sample', 0):10.3f} {r.get(f'engine_b{b}_vs_reference', 0):6.2f}x "
              f"{r.get(f'unguided_b{b}_s_per_sample', 0):12.3f}")
    path = Path(args.json or f"benchmarks/results/bench_schedulers-{args.preset}-cpu.json")
    path.write_text(json.dumps({**versions(), "commit": commit(), "preset": args.preset, "steps": args.steps,
                                "feedback_every": args.feedback_every, "batches": args.batches,
                                "device": "cpu (2 cores)", "rows": rows, "runs": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
