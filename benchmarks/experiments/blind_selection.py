"""A recipe chosen blind: the groups demo's best guidance recipe picked on development seeds by a fixed rule,
then measured, with unguided synthesis, on test seeds the choice never saw.

    python benchmarks/experiments/blind_selection.py [--prior milder|matched] [--quick]

The protocol is fixed here and in the README before any run (README, "A recipe chosen blind"):
- ``GRID``: 12 recipes, CFG scale x (unguided, loss 0.03, loss 0.1, entropy 0.03); every other setting is the
  groups demo's (``DemoConfig.groups``).
- ``DEV_SEEDS`` (0, 1, 2: the seeds every earlier groups table used) and ``TEST_SEEDS`` (15-19: no guidance
  result was ever measured on them; their generators were only checked for the gate), disjoint.
- ``RULE``: the highest mean minority-group accuracy over the development seeds, in points rounded to one
  decimal; a tie goes to the cheaper recipe (generation time per image against unguided CFG 1.5, measured
  interleaved in the same run, mean over the development seeds).
- On the test seeds: the selected recipe, unguided at the demo's CFG 1.5 (``BASELINE``) and, when the
  selection guides at another CFG, unguided at that CFG (what the feedback alone adds). Reported: worst-group
  (the paper's number), the mean of the 5 worst groups, minority-group and overall accuracy, each mean +- std
  over the seeds with the paired difference per seed, and per seed a 95% bootstrap interval over test images.

Whatever the test seeds say is the result: nothing here reads them to choose. Each seed's run is cached
(the demo's cache under --out, shared with the other groups benches) and its row is written to the JSON as
it comes, so an interrupted run resumes; a JSON of another grid, seeds or configuration is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fgds_engine.bench import commit
from fgds_engine.demo import DemoConfig, run_demo
from fgds_engine.demo.experiment import mean_std, read_json, write_json

GRID = tuple((criterion, scale, cfg) for cfg in (1.0, 1.5, 3.0)
             for criterion, scale in ((None, 0.0), ("loss", 0.03), ("loss", 0.1), ("entropy", 0.03)))
DEV_SEEDS = (0, 1, 2)
TEST_SEEDS = (15, 16, 17, 18, 19)
BASELINE = (None, 0.0, 1.5)
RULE = ("the highest mean minority-group accuracy over the development seeds (points, rounded to 0.1); a tie "
        "goes to the lower generation time per image against unguided CFG 1.5")
METRICS = ("worst_group", "worst5", "minority", "overall")
# --quick: the protocol on the quick demo (numbers mean nothing; the stages and the files do)
QUICK = {"grid": ((None, 0.0, 1.5), ("loss", 0.03, 1.5), ("entropy", 0.03, 3.0)), "dev": (0,), "test": (1,)}


def config(seed: int, prior: str, recipes, quick: bool) -> DemoConfig:
    if quick:
        return DemoConfig.quick(seed, "groups", color_prior=prior, recipes=tuple(recipes))
    return DemoConfig.groups(seed, prior, recipes=tuple(recipes))


def name(recipe, cfg: DemoConfig) -> str:
    """The recipe's variant name in the demo (``DemoConfig.recipe_variant``)."""
    return cfg.recipe_variant(*recipe).name


def seed_row(metrics: dict, names: dict) -> dict:
    """One seed's run, per recipe name: the group metrics (fractions), their bootstrap intervals and the
    generation time per image against unguided CFG 1.5."""
    row = {}
    for n in names.values():
        acc = metrics["accuracy"][n]
        time = metrics["samples"][n]["time_vs_no_feedback"]
        row[n] = {k: acc[k] for k in METRICS} | {"intervals": acc["intervals"], "time_vs_no_feedback": time}
    return row


def rank(dev: dict, names: dict) -> list[dict]:
    """The development seeds' ranking by ``RULE``: per recipe its mean metrics (points) and time."""
    rows = []
    for recipe, n in names.items():
        runs = [dev[s][n] for s in dev]
        row = {"recipe": list(recipe), "name": n,
               "time_vs_no_feedback": statistics.mean(r["time_vs_no_feedback"] for r in runs)}
        for k in METRICS:
            row[k] = mean_std([100 * r[k] for r in runs])
        rows.append(row)
    return sorted(rows, key=lambda r: (-round(r["minority"]["mean"], 1), r["time_vs_no_feedback"]))



def summarize_test(test: dict, names: dict, selected: str) -> dict:
    """Per reported recipe, mean +- std of each metric over the test seeds (points); per comparison
    (selected against each unguided one), the paired differences per seed, their mean +- std and on how
    many seeds the selected recipe is above, equal, below."""
    seeds = list(test)
    out = {"rows": {}, "paired": {}}
    for n in names.values():
        out["rows"][n] = {k: mean_std([100 * test[s][n][k] for s in seeds]) for k in METRICS}
        out["rows"][n]["time_vs_no_feedback"] = statistics.mean(
            test[s][n]["time_vs_no_feedback"] for s in seeds)
    for n in names.values():
        if n == selected:
            continue
        pair = {}
        for k in METRICS:
            diffs = [100 * (test[s][selected][k] - test[s][n][k]) for s in seeds]
            signs = {"above": sum(d > 0 for d in diffs), "equal": sum(d == 0 for d in diffs),
                     "below": sum(d < 0 for d in diffs)}
            pair[k] = mean_std(diffs) | signs
        out["paired"][f"{selected} - {n}"] = pair
    return out


def test_recipes(selected: tuple, baseline: tuple) -> list[tuple]:
    """What the test seeds run: the baseline, the selection, and unguided at the selection's CFG."""
    out = [baseline]
    if tuple(selected) != tuple(baseline):
        out.append(tuple(selected))
    own = (None, 0.0, selected[2])
    if own not in out:
        out.append(own)
    return out


def load(path: Path, protocol: dict) -> dict:
    """The JSON, if its block of this prior ran this protocol (or it has none); another protocol: refused."""
    data = read_json(path)
    block = data.get("priors", {}).get(protocol["prior"])
    if block and block["protocol"] != protocol:
        raise SystemExit(f"{path} holds another protocol for prior {protocol['prior']}: move it away to "
                         f"rerun (its grid, seeds or configuration differ)")
    return data


def save(path: Path, data: dict, prior: str, block: dict) -> None:
    data = dict(data)
    data.setdefault("priors", {})[prior] = block
    write_json(path, data)


def run_seed(out: Path, seed: int, prior: str, recipes, quick: bool) -> dict:
    cfg = config(seed, prior, recipes, quick)
    print(f"--- prior {prior}, seed {seed}: {len(recipes)} recipes", flush=True)
    metrics = run_demo(out / f"seed{seed}" / prior, config=cfg, progress=False, log=lambda *a: None)
    print(f"    {metrics['seconds']:.0f} s", flush=True)
    return seed_row(metrics, {r: name(r, cfg) for r in recipes})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", choices=("milder", "matched"), default="milder",
                    help="the generator's color prior [milder: where synthetic data lifts the groups]")
    ap.add_argument("--out", default="demo_out/quality-groups",
                    help="the demos' caches, one folder per seed and prior [demo_out/quality-groups]")
    ap.add_argument("--json", default="benchmarks/results/bench_demo_select-cpu.json", help="[%(default)s]")
    ap.add_argument("--quick", action="store_true", help="the quick demo, a 3-recipe grid, one seed each "
                    "(a smoke test; numbers mean nothing)")
    args = ap.parse_args(argv)
    grid, dev_seeds, test_seeds = ((QUICK["grid"], QUICK["dev"], QUICK["test"]) if args.quick
                                   else (GRID, DEV_SEEDS, TEST_SEEDS))
    out, path = Path(args.out), Path(args.json)
    probe = config(dev_seeds[0], args.prior, grid, args.quick)
    names = {r: name(r, probe) for r in grid}
    protocol = {"prior": args.prior, "grid": [list(r) for r in grid], "names": list(names.values()),
                "dev_seeds": list(dev_seeds), "test_seeds": list(test_seeds), "rule": RULE,
                "baseline": list(BASELINE), "quick": args.quick,
                "config": {k: v for k, v in probe.__dict__.items() if k not in ("seed", "recipes")}}
    data = load(path, json.loads(json.dumps(protocol)))
    block = data.get("priors", {}).get(args.prior) or {"protocol": protocol, "dev": {}, "test": {}}

    for s in dev_seeds:  # 1. development seeds: the whole grid
        if str(s) not in block["dev"]:
            block["dev"][str(s)] = run_seed(out, s, args.prior, grid, args.quick)
            block["dev_commit"] = commit()
            save(path, data, args.prior, block)
    ranking = rank(block["dev"], names)
    selected = tuple(ranking[0]["recipe"])
    block.update(ranking=ranking, selected={"recipe": list(selected), "name": ranking[0]["name"]})
    print(f"\ndevelopment seeds {list(dev_seeds)}, prior {args.prior}: ranking by {RULE}")
    print(ranking_table(ranking))
    print(f"selected: {ranking[0]['name']}")
    save(path, data, args.prior, block)

    recipes = test_recipes(selected, BASELINE)  # 2. test seeds: the selection and unguided, nothing else
    test_names = {r: name(r, probe) for r in recipes}
    for s in test_seeds:
        if str(s) not in block["test"]:
            block["test"][str(s)] = run_seed(out, s, args.prior, recipes, args.quick)
            block["test_commit"] = commit()
            save(path, data, args.prior, block)
    block["test_summary"] = summarize_test(block["test"], test_names, ranking[0]["name"])
    save(path, data, args.prior, block)
    print(f"\ntest seeds {list(test_seeds)} (never used to choose), prior {args.prior}")
    print(test_table(block["test_summary"], block["test"]))
    print(f"wrote {path}")


def ranking_table(ranking: list[dict]) -> str:
    lines = [f"{'':22}" + "".join(f" {k:>14}" for k in METRICS) + f" {'time vs none':>12}"]
    for r in ranking:
        cells = "".join(f" {r[k]['mean']:6.1f} +- {r[k]['std']:4.1f}" for k in METRICS)
        lines.append(f"{r['name']:22}{cells} {r['time_vs_no_feedback']:11.2f}x")
    return "\n".join(lines)


def test_table(summary: dict, test: dict) -> str:
    lines = [f"{'':22}" + "".join(f" {k:>14}" for k in METRICS)]
    for n, r in summary["rows"].items():
        lines.append(f"{n:22}" + "".join(f" {r[k]['mean']:6.1f} +- {r[k]['std']:4.1f}" for k in METRICS))
    for pair, r in summary["paired"].items():
        lines.append(f"{pair[:22]:22}" + "".join(
            f" {r[k]['mean']:+6.1f} ({r[k]['above']}/{r[k]['equal']}/{r[k]['below']})" for k in METRICS))
    lines.append("(last rows: paired difference in points, mean over seeds, and on how many seeds the "
                 "selected recipe is above / equal / below)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
