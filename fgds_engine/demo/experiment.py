"""The scaffold every demo experiment (``benchmarks/experiments/``) stands on: the shared arguments, mean +-
std summaries over seeds, tables, and one stamped, atomic JSON writer with a merge by setting, so that an
experiment script is its grid, its seeds, its metrics and its rule, and imports no other script."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..bench.timing import commit, versions
from ..writers import atomic_write
from .config import DemoConfig
from .runner import run_demo

# what a grid reports per setting (accuracies, in points)
GRID_METRICS = {"long-tail": ("few", "overall"), "groups": ("worst_group", "minority", "overall")}
SETTINGS = ("long-tail", "groups")


def mean_std(vals: list[float]) -> dict:
    """{"mean", "std" (sample std; 0 for one value), "values"} of the values that are not None."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "values": vals}


def sample_metric(samples: dict, key: str):
    """A per-variant sample statistic of a demo's metrics (nearest_*: by the nearest palette color)."""
    if key.startswith("nearest_"):
        return samples["nearest"][key.removeprefix("nearest_")]
    return samples[key]


def over_seeds(seeds: Iterable[int], label: str, folder: Callable[[int], Path],
               config: Callable[[int], DemoConfig]) -> Iterator[tuple[int, dict]]:
    """(seed, the demo's metrics) at each seed in order: ``folder(seed)`` holds its run and cache (a rerun
    resumes from the cache: what is cached is not trained or sampled again), ``config(seed)`` its
    configuration; says which seed runs and the seconds it took."""
    for s in seeds:
        print(f"--- {label}seed {s}", flush=True)
        metrics = run_demo(folder(s), config=config(s), progress=False, log=lambda *a: None)
        print(f"    {metrics['seconds']:.0f} s", flush=True)
        yield s, metrics


def write_json(path: str | Path, payload: dict, *, tag: str = "") -> Path:
    """``payload`` stamped with the machine, the versions and the commit, written atomically (``tag``: a
    writer's own temp name, where several may write the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({**payload, **versions(), "commit": commit()}, indent=1) + "\n").encode(),
                 tag)
    print(f"wrote {path}")
    return path


def read_json(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def stamped(block: dict) -> dict:
    """A setting's block with the commit and the machine it ran on (settings may run at different commits),
    as the generator experiment and each demo's metrics.json record them."""
    return block | {"commit": commit(), "machine": versions()}


def merged(old: dict, payload: dict, settings) -> dict:
    """``payload`` (this run's settings, each a block) over the JSON as it was: the settings this run did not
    touch keep their blocks when the file holds the same seeds and budgets (``--settings groups`` re-runs one
    setting and leaves the other's results, each block with its own commit and machine)."""
    same = all(old.get(k) == payload.get(k) for k in ("seeds", "quick"))
    before = {k: old[k] for k in ("commit", "note") if k in old}  # a block from before blocks were stamped
    kept = {k: before | old[k] for k in SETTINGS if same and k in old and k not in settings}
    return payload | kept


def write_grid(path: str | Path, payload: dict, settings) -> Path:
    """Write a grid's JSON (``merged`` with the file as it is now)."""
    return write_json(path, merged(read_json(path), payload, settings))


def grid_arguments(argv, description: str, name: str, settings: tuple[str, ...]):
    """The arguments every demo grid takes: settings, seeds, the cache folder, --quick, the JSON."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(settings),
                    help=f"[{' '.join(settings)}]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    ap.add_argument("--out", default=f"demo_out/{name}", help=f"cache and outputs [demo_out/{name}]")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test; numbers mean nothing)")
    path = f"benchmarks/results/bench_demo_{name}-cpu.json"
    ap.add_argument("--json", default=path, help=f"[{path}]")
    return ap.parse_args(argv)


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
    """Variants by metrics: mean +- std (points), milliseconds per image, time ratios."""
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
