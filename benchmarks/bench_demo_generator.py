"""The groups demo's generator alone, over many seeds: does it learn the digits and the palette every time?

    python benchmarks/bench_demo_generator.py [--seeds 10 11 ... 19] [--recipe NAME --set gen_lr=1e-3 ...]
    python benchmarks/bench_demo_generator.py --quick          # a smoke test (numbers mean nothing)

Per seed: the groups setting's data (matched prior), its generator trained as the demo trains it (or a
recipe: ``--set field=value`` overrides DemoConfig fields, e.g. ``gen_lr``, ``gen_steps``, ``ema_decay``)
and its oracle, cached under --out (the demo's cache layout and keys: a demo run's cache serves it, and an
interrupted run resumes). Then ``demo.gate.measure_generator``: 30 unguided samples per digit, their
oracle fidelity, between-colour and empty shares, majority-colour share against the prior and palette
shares against the generator's training set; the training loss curve (mean of every 100 steps) and the
training seconds.

The JSON keeps every recipe run (``recipes[name]``: overrides, rows per seed, summary); a seed already in it
is not run again. Default seeds 10-19: no table in the repository uses them.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import torch
from common import commit, versions

from fgds_engine.demo import DemoConfig
from fgds_engine.demo.gate import GATE, measure_generator
from fgds_engine.demo.models import Cache
from fgds_engine.demo.runner import Groups, generator_and_oracle


def parse_set(items: list[str]) -> dict:
    """``field=value`` pairs (a Python literal, else the text)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _ or key not in DemoConfig.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected field=value with a DemoConfig field")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def measure_seed(seed: int, overrides: dict, out: Path, quick: bool) -> dict:
    cfg = (DemoConfig.quick(seed, "groups", **overrides) if quick else DemoConfig.groups(seed, "matched",
                                                                                         **overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        s = Groups(cfg, log=lambda *a: None)
        cache = Cache(out / f"seed{seed}" / "cache", log=lambda *a: None)
        unet, sched, oracle = generator_and_oracle(cache, cfg, s, progress=False)
        m = measure_generator(unet, sched, oracle, cfg, per_class=min(30, cfg.synthetic_per_class),
                              train_colors=s.generator_colors)  # as the demo measures it
        m["training"] = cache.info("generator" + s.suffix, s.gen_key)
        m["seconds"] = time.perf_counter() - t0
        return m
    finally:
        torch.set_num_threads(threads)


def summarise(rows: dict) -> dict:
    fid = [r["fidelity"] for r in rows.values()]
    between = [r["between_share"] for r in rows.values()]
    train = [r["training"]["seconds"] for r in rows.values() if r.get("training")]
    return {"seeds": len(rows), "fidelity_min": min(fid), "fidelity_mean": sum(fid) / len(fid),
            "between_max": max(between), "between_mean": sum(between) / len(between),
            "below_gate": sorted(int(s) for s, r in rows.items() if not r["passes"]),
            "train_seconds_mean": sum(train) / len(train) if train else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 20)), help="[10 ... 19]")
    ap.add_argument("--recipe", default="demo", help="the name of these overrides in the JSON [demo]")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="DemoConfig fields of the recipe (none: the demo's own)")
    ap.add_argument("--out", default="demo_out/generator", help="caches [demo_out/generator]")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    ap.add_argument("--json", default="benchmarks/results/bench_demo_generator-cpu.json")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("quick", args.quick) != args.quick:
        raise SystemExit(f"{path} holds {'quick' if result['quick'] else 'full'} runs: use another --json")
    recipe = result.setdefault("recipes", {}).setdefault(args.recipe, {"overrides": overrides, "rows": {}})
    if recipe["overrides"] != overrides:
        raise SystemExit(f"recipe {args.recipe!r} was run with {recipe['overrides']}: name this one "
                         "otherwise")
    out = Path(args.out) / args.recipe
    for seed in args.seeds:
        if str(seed) in recipe["rows"]:
            continue
        m = measure_seed(seed, overrides, out, args.quick)
        recipe["rows"][str(seed)] = m
        recipe["summary"] = summarise(recipe["rows"])
        result |= {**versions(), "commit": commit(), "quick": args.quick, "gate": GATE}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")  # after every seed: results as they come
        print(f"{args.recipe} seed {seed}: fidelity {m['fidelity']:.1%}, between {m['between_share']:.1%}, "
              f"majority colour {m['majority_share']:.1%}; {'passes' if m['passes'] else 'BELOW'} "
              f"({m['seconds']:.0f} s)", flush=True)
    s = recipe.get("summary")
    if s:
        print(f"{args.recipe}: {s['seeds']} seeds, fidelity min {s['fidelity_min']:.1%} mean "
              f"{s['fidelity_mean']:.1%}, between max {s['between_max']:.1%}; below the gate: "
              f"{s['below_gate'] or 'none'}")


if __name__ == "__main__":
    main()
