"""The groups demo's generator alone, over many seeds: does it learn the digits and the palette every time?

    python benchmarks/experiments/generator.py [--seeds 10 11 ... 19] [--recipe NAME --set gen_lr=1e-3 ...]
    python benchmarks/experiments/generator.py --recipe epsilon --set objective=ddpm clip_sample=True --probe
    python benchmarks/experiments/generator.py --quick          # a smoke test (numbers mean nothing)

Per seed: the groups setting's data (matched prior), its generator trained as the demo trains it (or a
recipe: ``--set field=value`` overrides DemoConfig fields, e.g. ``gen_lr``, ``gen_steps``, ``ema_decay``)
and its oracle, cached under --out (the demo's cache layout and keys: a demo run's cache serves it, and an
interrupted run resumes). Then ``demo.gate.measure_generator``: 30 unguided samples per digit, their
oracle fidelity, between-colour and empty shares, majority-colour share against the prior and palette
shares against the generator's training set; the training loss curve (mean of every 100 steps), the
training seconds, and ``demo.gate.denoising_error``: the error of the generator's x0 estimate per noise level
against the class mean's (why a generator misses the gate: an epsilon generator's estimate at high noise).

The JSON keeps every recipe run (``recipes[name]``: overrides, rows per seed, summary); a seed already in it
is not run again (a row without the x0 errors gets them from its cached generator). Recipes may run side by
side into the same JSON: each writes its own recipe into the file as it is then. Default seeds 10-19: no
table in the repository uses them.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from fgds_engine.bench import commit, fastest_interleaved, versions
from fgds_engine.demo import DemoConfig
from fgds_engine.demo.experiment import read_json, write_json
from fgds_engine.demo.gate import GATE, denoising_error, measure_generator
from fgds_engine.demo.models import Cache, make_generator, torch_threads, train_generator
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


def config(seed: int, overrides: dict, quick: bool) -> DemoConfig:
    return (DemoConfig.quick(seed, "groups", **overrides) if quick else
            DemoConfig.groups(seed, "matched", **overrides))


# the demo's DDIM sampler changed one way each (--probe): does a generator below the gate pass under another?
SAMPLER_PROBES = {
    "clip off": lambda cfg, sched: (cfg, DDIMScheduler.from_config(sched.config, clip_sample=False)),
    "clip on": lambda cfg, sched: (cfg, DDIMScheduler.from_config(sched.config, clip_sample=True)),
    "cfg 1.0": lambda cfg, sched: (replace(cfg, guidance_scale=1.0), sched),
    "cfg 3.0": lambda cfg, sched: (replace(cfg, guidance_scale=3.0), sched),
    "100 steps": lambda cfg, sched: (replace(cfg, sample_steps=100), sched),
    "leading spacing": lambda cfg, sched: (cfg, DDIMScheduler.from_config(sched.config,
                                                                          timestep_spacing="leading")),
}


def measure_seed(seed: int, overrides: dict, out: Path, quick: bool, row: dict | None = None,
                 probe: bool = False) -> dict:
    """The seed's measure (``row``: what was measured before; what it lacks is added from the cached
    generator: the x0 errors, and with ``probe`` the sampler probes)."""
    cfg = config(seed, overrides, quick)
    with torch_threads(cfg.threads):
        t0 = time.perf_counter()
        s = Groups(cfg, log=lambda *a: None)
        cache = Cache(out / f"seed{seed}" / "cache", log=lambda *a: None)
        unet, sched, oracle = generator_and_oracle(cache, cfg, s, progress=False)
        per_class = min(30, cfg.synthetic_per_class)
        if row is None:
            row = measure_generator(unet, sched, oracle, cfg, per_class=per_class,
                                    train_colors=s.generator_colors)  # as the demo measures it
            row["training"] = cache.info("generator" + s.suffix, s.gen_key)
            row["seconds"] = time.perf_counter() - t0
        if "denoising" not in row:
            row = row | {"denoising": denoising_error(unet, sched, *s.generator, cfg)}
        if probe and lacks_probes(row):  # a probe added since the row was measured: measured now
            done = row.get("probe", {})
            row = row | {"probe": {name: done.get(name) or sampler_probe(unet, *change(cfg, sched), oracle,
                                                                         per_class)
                                   for name, change in SAMPLER_PROBES.items()}}
        return row


def sampler_probe(unet, cfg: DemoConfig, sched, oracle, per_class: int) -> dict:
    m = measure_generator(unet, sched, oracle, cfg, per_class=per_class)
    return {k: m[k] for k in ("fidelity", "between_share", "majority_share", "passes")}


def step_seconds(overrides: dict, quick: bool, steps: int) -> dict:
    """Seconds per training step of the recipe's generator and of the epsilon objective's on the same data
    (seed 0), ``steps`` steps each, timed in alternation (fastest of 3): the recipe's training cost against
    the demo's before v prediction (the budget: at most 1.5x)."""
    cfg = replace(config(0, overrides, quick), gen_steps=steps)
    s = Groups(cfg, log=lambda *a: None)

    def train(c: DemoConfig):
        unet, sched = make_generator(c)
        return lambda: train_generator(unet, sched, *s.generator, c, progress=False)

    with torch_threads(cfg.threads):
        t = fastest_interleaved({"recipe": train(cfg), "epsilon": train(replace(cfg, objective="ddpm"))},
                                torch.device("cpu"), repeats=3)
    return {"steps": steps, "recipe": t["recipe"] / steps, "epsilon": t["epsilon"] / steps,
            "ratio": t["recipe"] / t["epsilon"]}


def lacks_probes(row: dict) -> bool:
    return set(row.get("probe", {})) != set(SAMPLER_PROBES)


def missing(row: dict | None, probe: bool) -> bool:
    return row is None or "denoising" not in row or (probe and lacks_probes(row))


def summarise(rows: dict) -> dict:
    fid = [r["fidelity"] for r in rows.values()]
    between = [r["between_share"] for r in rows.values()]
    train = [r["training"]["seconds"] for r in rows.values() if r.get("training")]
    return {"seeds": len(rows), "fidelity_min": min(fid), "fidelity_mean": sum(fid) / len(fid),
            "between_max": max(between), "between_mean": sum(between) / len(between),
            "below_gate": sorted(int(s) for s, r in rows.items() if not r["passes"]),
            "train_seconds_mean": sum(train) / len(train) if train else None}


def save(path: Path, name: str, recipe: dict, quick: bool) -> None:
    """The recipe into the JSON as the file is now (another recipe may be running beside this one into it),
    with the commit and machine of its last run."""
    result = read_json(path)
    result.setdefault("recipes", {})[name] = recipe | {"commit": commit(), "machine": versions()}
    write_json(path, result | {"quick": quick, "gate": GATE}, tag=f".{os.getpid()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 20)), help="[10 ... 19]")
    ap.add_argument("--recipe", default="demo", help="the name of these overrides in the JSON [demo]")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="DemoConfig fields of the recipe (none: the demo's own)")
    ap.add_argument("--out", default="demo_out/generator", help="caches [demo_out/generator]")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    ap.add_argument("--json", default="benchmarks/results/bench_demo_generator-cpu.json")
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="also time N training steps of the recipe against the epsilon objective's "
                         "(alternating, fastest of 3) [0: no]")
    ap.add_argument("--probe", action="store_true",
                    help="also measure each seed's generator under the sampler changed one way each "
                         f"({', '.join(SAMPLER_PROBES)}; DDIM generators)")
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
    if args.probe and config(0, overrides, args.quick).objective == "flow":
        raise SystemExit("--probe changes the DDIM sampler: not for a flow generator")
    for seed in args.seeds:
        row = recipe["rows"].get(str(seed))
        if not missing(row, args.probe):
            continue
        m = measure_seed(seed, overrides, out, args.quick, row, args.probe)
        recipe["rows"][str(seed)] = m
        recipe["summary"] = summarise(recipe["rows"])
        save(path, args.recipe, recipe, args.quick)  # after every seed: results as they come
        print(f"{args.recipe} seed {seed}: fidelity {m['fidelity']:.1%}, between {m['between_share']:.1%}, "
              f"majority colour {m['majority_share']:.1%}; {'passes' if m['passes'] else 'BELOW'} "
              f"({m['seconds']:.0f} s)", flush=True)
    if args.time_steps:
        recipe["step_seconds"] = step_seconds(overrides, args.quick, args.time_steps)
        save(path, args.recipe, recipe, args.quick)
        c = recipe["step_seconds"]
        print(f"{args.recipe}: {c['recipe'] * 1000:.1f} ms per training step, epsilon "
              f"{c['epsilon'] * 1000:.1f} ms: {c['ratio']:.2f}x")
    s = recipe.get("summary")
    if s:
        print(f"{args.recipe}: {s['seeds']} seeds, fidelity min {s['fidelity_min']:.1%} mean "
              f"{s['fidelity_mean']:.1%}, between max {s['between_max']:.1%}; below the gate: "
              f"{s['below_gate'] or 'none'}")


if __name__ == "__main__":
    main()
