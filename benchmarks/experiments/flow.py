"""A flow-matching generator on real data: the digits demos with the rectified-flow objective, against DDPM.

    python benchmarks/experiments/flow.py [--seeds 0 1 2] [--quick] [--settings long-tail groups]

The grid (fixed in the README, "Flow matching on real data", before any run): per setting and seed, two
generators of the same UNet2DModel, data and budget, one trained with DDPM's epsilon objective (sampled by
DDIM, the demos' own) and one with rectified flow (the velocity n - x0 at a uniform noise level, sampled by
FlowMatchEuler); each at 25 steps (the demos') and 10, unguided and with entropy feedback (0.03 of ||x_t||,
5 feedback steps spread from the first, the auto form: shift for both single-step solvers), plus entropy in
the score form at 25. Under flow matching no term pushes above s = 0.99, so the first of the 5 feedback
steps (s = 1) runs unguided: 4 pushes, against DDPM's 5. Nothing is tuned for either generator. Long-tail:
few-shot / overall accuracy; groups (matched prior): worst-group / minority / overall; both: the oracle's
fidelity and seconds per image.
"""

from __future__ import annotations

from pathlib import Path

from fgds_engine.demo import DemoConfig
from fgds_engine.demo.experiment import GRID_METRICS as METRICS
from fgds_engine.demo.experiment import grid_arguments, over_seeds, per_seed, summarise, table, write_grid

OBJECTIVES = {"ddpm": ("ddim", 10), "flow": ("flow-euler", 10)}  # the generator -> its 10-step row


def config(setting: str, seed: int, objective: str, quick: bool) -> DemoConfig:
    kw = dict(objective=objective, solvers=(OBJECTIVES[objective],))
    if setting == "groups":
        return DemoConfig.quick(seed, "groups", **kw) if quick else DemoConfig.groups(seed, "matched", **kw)
    return DemoConfig.quick(seed, **kw) if quick else DemoConfig(seed=seed, **kw)


def run_setting(setting: str, args) -> dict:
    out = {}
    for objective in OBJECTIVES:
        runs = {}
        for s, metrics in over_seeds(args.seeds, f"{setting}, {objective} generator, ",
                                     lambda s, o=objective: Path(args.out) / setting / o / f"seed{s}",
                                     lambda s, o=objective: config(setting, s, o, args.quick)):
            runs[s] = metrics
        summary = summarise(runs, args.seeds, METRICS[setting])
        print(f"{setting}, {objective} generator")
        print(table(summary, METRICS[setting] + ("fidelity", "seconds_per_image")))
        out[objective] = {"summary": summary, "per_seed": per_seed(runs)}
    return out


def main(argv=None):
    args = grid_arguments(argv, __doc__.splitlines()[0], "flow", ("long-tail", "groups"))
    head = {"seeds": args.seeds, "quick": args.quick,
            "grid": {k: ["25 steps (own scheduler)", list(v)] for k, v in OBJECTIVES.items()},
            "feedback_rule": "entropy 0.03, 5 feedback steps spread from the first (flow: the s = 1 step "
                             "unguided), auto form"}
    results = {}
    for setting in args.settings:  # the settings not run now keep their blocks (same seeds and budgets)
        results[setting] = run_setting(setting, args)
        write_grid(args.json, head | results, args.settings)


if __name__ == "__main__":
    main()
