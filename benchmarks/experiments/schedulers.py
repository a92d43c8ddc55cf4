"""Quality per second at fewer steps: the digits demos under other schedulers, over seeds, mean and spread.

    python benchmarks/experiments/schedulers.py [--seeds 0 1 2] [--quick] [--settings long-tail groups]

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

from pathlib import Path

from fgds_engine.demo import DemoConfig
from fgds_engine.demo.experiment import (
    GRID_METRICS,
    grid_arguments,
    over_seeds,
    per_seed,
    stamped,
    summarise,
    table,
    write_grid,
)

GRID = (("dpmpp-2m", 10), ("dpmpp-2m", 15), ("unipc", 10), ("euler", 20))
METRICS = GRID_METRICS


def run_setting(setting: str, args, done=lambda block: None) -> dict:
    """The setting's grid over the seeds; ``done(block)`` after each seed with the block so far."""
    runs = {}
    def config(s):
        if setting == "groups":
            return (DemoConfig.quick(s, "groups", solvers=GRID) if args.quick
                    else DemoConfig.groups(s, "matched", solvers=GRID))
        return DemoConfig.quick(s, solvers=GRID) if args.quick else DemoConfig(seed=s, solvers=GRID)

    for s, metrics in over_seeds(args.seeds, f"{setting}, ", lambda s: Path(args.out) / setting / f"seed{s}",
                                 config):
        runs[s] = metrics
        block = {"seeds_done": sorted(runs),
                 "summary": summarise(runs, sorted(runs), METRICS[setting], time_ratio="time_vs_ddim25"),
                 "per_seed": per_seed(runs)}
        done(block)
    print(table(block["summary"], METRICS[setting] + ("fidelity", "seconds_per_image", "time_vs_ddim25")))
    return block


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
