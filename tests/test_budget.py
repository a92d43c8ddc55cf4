"""Sample efficiency and the blind selection (issue 30): the recipes' names, the nested budget caps, the
less noisy group metrics and their bootstrap intervals, the budget-equivalence arithmetic, the selection rule,
and both benches end to end on the quick demos (their numbers mean nothing there; shapes, files, resuming
and refusals do)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script

from fgds_engine.demo import COLORS, DemoConfig, group_metrics
from fgds_engine.demo.charts import cap_label
from fgds_engine.demo.config import Variant
from fgds_engine.demo.data import bootstrap_intervals
from fgds_engine.demo.runner import first_per_class
from fgds_engine.errors import InputError

budget = load_script("benchmarks/experiments/budget.py")
select = load_script("benchmarks/experiments/blind_selection.py")


def test_recipes_are_named_as_the_other_grids_name_the_same_variant():
    cfg = DemoConfig.groups(0, "milder", recipes=select.GRID)
    assert [v.name for v in cfg.variants()] == [
        "cfg 1.0", "cfg 1.0 loss", "cfg 1.0 loss 0.1", "cfg 1.0 entropy",
        "no feedback", "loss", "loss 0.1", "entropy",
        "cfg 3.0", "cfg 3.0 loss", "cfg 3.0 loss 0.1", "cfg 3.0 entropy"]
    # the same variants (so the same cached samples and classifiers) as the criteria, scale and coverage grids
    byname = {v.name: v for v in cfg.variants()}
    assert byname["no feedback"] == Variant("no feedback")
    assert byname["loss"] == Variant("loss", "loss", 0.03)
    assert byname["loss 0.1"] == Variant("loss 0.1", "loss", 0.1)
    coverage = {v.name: v for v in DemoConfig.groups(0, coverage=True).variants()}
    for n in ("cfg 1.0", "cfg 1.0 entropy", "cfg 3.0", "cfg 3.0 entropy"):
        assert byname[n] == coverage[n]
    # what the variants sample does not depend on the list run: the recipes and caps stay out of the key
    from fgds_engine.demo.sampling import sample_key

    plain = sample_key(DemoConfig.groups(0))
    assert sample_key(DemoConfig.groups(0, recipes=select.GRID, budget_caps=(5, 10))) == plain
    with pytest.raises(InputError, match=r"^a recipe is \(criterion, feedback scale > 0, CFG >= 1 or None\) "
                       r"or \(None, 0, CFG or None\), got \('loss', 0\.0, None\)$"):
        DemoConfig(recipes=(("loss", 0.0, None),))
    with pytest.raises(InputError, match=r"^budget caps must be at least 1 image per class, got \[0, 5\]$"):
        DemoConfig(budget_caps=(0, 5))


def test_a_cap_keeps_the_first_jobs_of_every_class_with_their_seeds(tmp_path):
    from fgds_engine.data import scan_imagefolder
    from fgds_engine.demo.data import images_to_folder
    from fgds_engine.plan import PlanOptions, make_plan

    ys = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert first_per_class(ys, 2).tolist() == [0, 1, 3, 4, 5, 6]
    assert first_per_class(ys, 9).tolist() == list(range(9))
    # the jobs of a plan asking 3 synthetic images per class are the first 3 of every class of one asking 8,
    # seeds and exemplars included (groups: synthetic_per_class; long-tail: budget_cap filters the same way)
    x, y = torch.zeros(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    images_to_folder(tmp_path / "real", x, y)
    scan = scan_imagefolder(tmp_path / "real", verify=False)
    full, small = (make_plan(scan, PlanOptions(run_seed=7, min_per_class=n)) for n in (8, 3))
    ys_full = torch.tensor([j.class_index for j in full.jobs])
    kept = [full.jobs[i] for i in first_per_class(ys_full, 3)]
    same = lambda jobs: [(j.job_id, j.seed, j.exemplar) for j in jobs]  # noqa: E731
    assert same(kept) == same(small.jobs)


def test_worst5_and_the_bootstrap_intervals_on_a_hand_made_case():
    # 8 groups of 4 test images (digits 0 and 1 in the 4 colors): known per-group accuracy
    labels = torch.tensor([d for d in (0, 1) for _ in range(16)])
    colors = torch.tensor([c for _ in (0, 1) for c in range(4) for _ in range(4)])
    right = {(0, 0): 4, (0, 1): 3, (0, 2): 2, (0, 3): 4, (1, 0): 1, (1, 1): 4, (1, 2): 0, (1, 3): 4}
    preds = labels.clone()
    for i in range(len(labels)):
        d, c = labels[i].item(), colors[i].item()
        if i % 4 >= right[d, c]:
            preds[i] = 9
    m = group_metrics(preds, labels, colors)
    assert m["worst_group"] == 0.0 and m["worst_group_name"] == f"1 {COLORS[2]}"
    assert m["worst5"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 4 / 5)
    assert m["minority"] == pytest.approx((3 + 2 + 4 + 1 + 0 + 4) / 24)  # majority: 0 red, 1 green
    iv = m["intervals"]
    assert set(iv) == {"overall", "worst_group", "worst5", "minority"}
    for k, (lo, hi) in iv.items():
        assert lo <= m[k] <= hi, k
    assert iv["worst_group"] == [0.0, 0.0]  # a group with no right answer stays at 0 whatever is redrawn
    assert m["intervals"] == group_metrics(preds, labels, colors)["intervals"]  # seeded: the same every run
    # all right: every draw is 1
    assert group_metrics(labels, labels, colors)["intervals"] == {k: [1.0, 1.0] for k in iv}
    # more test images per group: a narrower interval around the same value
    correct = (torch.arange(400) // 4 % 2).float()  # every group half right
    groups = torch.arange(400) % 4
    wide = bootstrap_intervals(correct[:40], groups[:40], torch.zeros(40, dtype=torch.bool))["overall"]
    narrow = bootstrap_intervals(correct, groups, torch.zeros(400, dtype=torch.bool))["overall"]
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_reach_and_the_budget_equivalence_arithmetic():
    assert budget.reach([(0, 10.0), (10, 20.0), (20, 30.0)], 15.0) == 5.0
    assert budget.reach([(0, 10.0), (10, 20.0), (20, 30.0)], 30.0) == 20.0
    assert budget.reach([(0, 10.0), (10, 20.0)], 20.5) is None
    assert budget.reach([(0, 12.0), (10, 11.0), (20, 13.0)], 11.5) == 0  # real only already there
    assert budget.reach([(0, 10.0), (10, 9.0), (20, 13.0)], 12.0) == pytest.approx(17.5)
    point = lambda n, acc, sec: {"images": n, "seconds": sec, "few": acc}  # noqa: E731
    rows = {  # two seeds; unguided reaches 0.9 at 100 images (10 s); loss at 0.5 of them, seed 2 never
        "1": {"no feedback": {"0": point(0, 0.5, 0), "fill": point(100, 0.9, 10.0)},
              "loss": {"0": point(0, 0.5, 0), "50": point(50, 0.9, 20.0), "fill": point(100, 0.9, 40.0)}},
        "2": {"no feedback": {"0": point(0, 0.5, 0), "fill": point(100, 0.8, 10.0)},
              "loss": {"0": point(0, 0.5, 0), "50": point(50, 0.6, 20.0), "fill": point(100, 0.7, 40.0)}},
    }
    e = budget.equivalence(rows, ["no feedback", "loss"], "few")
    assert e["no feedback"]["images"] == {"per_seed": [1.0, 1.0], "reached": 2, "seeds": 2, "mean": 1.0,
                                          "std": 0.0}
    assert e["loss"]["images"] == {"per_seed": [0.5, None], "reached": 1, "seeds": 2, "mean": 0.5, "std": 0.0}
    assert e["loss"]["seconds"]["per_seed"] == [2.0, None]  # half the images at 4x the time per image


def test_the_plot_names_the_full_budget_in_images_per_class_where_it_is_one_number():
    groups = {"0": {"images": 0}, "5": {"images": 50}, "10": {"images": 100}, "fill": {"images": 600}}
    long_tail = {"0": {"images": 0}, "1": {"images": 9}, "20": {"images": 180}, "fill": {"images": 876}}
    assert [cap_label(groups, c) for c in groups] == ["real", "5", "10", "60 fill"]
    assert [cap_label(long_tail, c) for c in long_tail] == ["real", "1", "20", "fill"]


def test_the_selection_rule_ties_go_to_the_cheaper_recipe():
    row = lambda minority, t: {"minority": minority, "worst_group": 0.5, "worst5": 0.6,  # noqa: E731
                               "overall": 0.9, "time_vs_no_feedback": t}
    dev = {"0": {"a": row(0.9001, 1.2), "b": row(0.9004, 0.6), "c": row(0.95, 1.5), "d": row(0.90, 0.5)},
           "1": {"a": row(0.9001, 1.2), "b": row(0.9004, 0.6), "c": row(0.80, 1.5), "d": row(0.90, 0.5)}}
    names = {("a",): "a", ("b",): "b", ("c",): "c", ("d",): "d"}
    ranking = select.rank(dev, names)
    # c: 87.5; a, b, d: 90.0 after rounding to 0.1 point: the cheapest of them first
    assert [r["name"] for r in ranking] == ["d", "b", "a", "c"]
    assert ranking[3]["minority"]["values"] == [95.0, 80.0] and ranking[0]["time_vs_no_feedback"] == 0.5
    assert select.test_recipes(("loss", 0.03, 1.5), (None, 0.0, 1.5)) == [
        (None, 0.0, 1.5), ("loss", 0.03, 1.5)]
    assert select.test_recipes(("loss", 0.1, 3.0), (None, 0.0, 1.5)) == [
        (None, 0.0, 1.5), ("loss", 0.1, 3.0), (None, 0.0, 3.0)]
    assert select.test_recipes((None, 0.0, 1.5), (None, 0.0, 1.5)) == [(None, 0.0, 1.5)]
    assert select.test_recipes((None, 0.0, 3.0), (None, 0.0, 1.5)) == [(None, 0.0, 1.5), (None, 0.0, 3.0)]


def test_readme_declares_the_grid_seeds_and_rule_the_script_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    decl = readme.split("### A recipe chosen blind")[1].split("Whatever the test seeds say")[0]
    flat = " ".join(decl.split())
    assert len(select.GRID) == 12 and "12 recipes" in flat
    assert sorted({r[2] for r in select.GRID}) == [1.0, 1.5, 3.0] and "CFG scale 1.0, 1.5 or 3.0" in flat
    assert sorted({r[:2] for r in select.GRID}, key=str) == sorted(
        {(None, 0.0), ("loss", 0.03), ("loss", 0.1), ("entropy", 0.03)}, key=str)
    assert "unguided, with loss feedback at 0.03 (the paper's scale), loss at 0.1, or entropy at 0.03" in flat
    assert select.DEV_SEEDS == (0, 1, 2) and "Development seeds 0, 1, 2" in flat
    assert select.TEST_SEEDS == (15, 16, 17, 18, 19) and "test seeds 15-19" in flat
    rule = "the highest mean minority-group accuracy over the development seeds (points, rounded to 0.1)"
    assert rule in flat


def test_budget_bench_groups_quick(groups_quick, tmp_path, monkeypatch, capsys):
    """The groups budget curve on the quick demo's cache (seed 0, matched prior: its variants' samples and
    full-budget classifiers serve; the caps train their own)."""
    shutil.copytree(groups_quick[0] / "cache", tmp_path / "out" / "seed0" / "matched" / "cache")
    demo = json.loads((groups_quick[0] / "metrics.json").read_text())
    path = tmp_path / "b.json"
    args = ["--setting", "groups", "--quick", "--seeds", "0", "--prior", "matched", "--out",
            str(tmp_path / "out"), "--json", str(path)]
    budget.main(args)
    r = json.loads(path.read_text())
    row = r["per_seed"]["0"]
    assert list(row) == ["no feedback", "loss", "entropy"] and r["grid"]["caps"] == [2, 4]
    for v, points in row.items():
        assert list(points) == ["0", "2", "4", "fill"]
        assert [p["images"] for p in points.values()] == [0, 20, 40, 60]
        per_image = points["fill"]["seconds"] / 60
        assert points["2"]["seconds"] == pytest.approx(20 * per_image)
        for k in ("minority", "worst5", "worst_group", "overall"):  # fill: the demo's own classifier
            assert points["fill"][k] == demo["accuracy"][v][k]
            assert points["0"][k] == demo["accuracy"]["real only"][k]
        assert set(points["2"]["intervals"]) == {"overall", "worst_group", "worst5", "minority"}
    e = r["equivalence"]["minority"]["no feedback"]["images"]
    assert e["seeds"] == 1 and e["per_seed"][0] is not None and e["per_seed"][0] <= 1.0
    assert r["summary"]["loss"]["4"]["minority"]["values"] == [100 * row["loss"]["4"]["minority"]]
    assert r["commits"]["0"] == r["commit"] and r["seeds"] == [0]
    assert (tmp_path / "b-curve.png").stat().st_size > 0
    # every seed is in: a rerun runs nothing and writes the same rows
    monkeypatch.setattr(budget, "run_demo", lambda *a, **k: pytest.fail("ran a seed already in the JSON"))
    budget.main(args)
    assert json.loads(path.read_text())["per_seed"] == r["per_seed"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="holds another grid: move it away to rerun"):
        budget.main(args[:-2] + ["--caps", "3", "--json", str(path)])


def test_budget_bench_long_tail_quick_leaves_the_full_budget_run_as_it_was(quick_demo, tmp_path, monkeypatch):
    """The long-tail curve on the quick demo's cache: the caps' classifiers train and leave torch's global
    generator as they found it (the long-tail classifiers draw their initialisation from it, so the
    full-budget ones are those of a run without caps); a cap past a class's deficit keeps all of the class."""
    from fgds_engine.demo import runner

    folder, _, demo = quick_demo
    shutil.copytree(folder / "cache", tmp_path / "out" / "seed0" / "cache")
    curve, states = runner._budget_curve, []

    def checked(*a, **k):
        before = torch.random.get_rng_state()
        out = curve(*a, **k)
        states.append(torch.equal(before, torch.random.get_rng_state()))
        return out

    monkeypatch.setattr(runner, "_budget_curve", checked)
    path = tmp_path / "b.json"
    budget.main(["--quick", "--seeds", "0", "--out", str(tmp_path / "out"), "--json", str(path)])
    assert states == [True, True, True]
    row = json.loads(path.read_text())["per_seed"]["0"]
    deficits = [min(6, max(demo["train_counts"]) - n) for n in demo["train_counts"]]
    for v, points in row.items():
        assert points["fill"]["few"] == demo["accuracy"][v]["few"], v
        assert points["fill"]["overall"] == demo["accuracy"][v]["overall"], v
        assert points["0"]["few"] == demo["accuracy"]["real only"]["few"]
        assert [p["images"] for p in points.values()] == [0, sum(min(1, d) for d in deficits),
                                                          sum(min(3, d) for d in deficits), sum(deficits)]


def test_select_bench_quick(groups_quick, tmp_path, monkeypatch, capsys):
    """The protocol on the quick demo: the development seed from the quick demo's cache, the test seed cold;
    the JSON records both phases and resumes; another protocol in it is refused."""
    shutil.copytree(groups_quick[0] / "cache", tmp_path / "out" / "seed0" / "matched" / "cache")
    path = tmp_path / "s.json"
    args = ["--quick", "--prior", "matched", "--out", str(tmp_path / "out"), "--json", str(path)]
    select.main(args)
    r = json.loads(path.read_text())["priors"]["matched"]
    assert r["protocol"]["dev_seeds"] == [0] and r["protocol"]["test_seeds"] == [1]
    assert list(r["dev"]["0"]) == ["no feedback", "loss", "cfg 3.0 entropy"]
    ranking = [x["name"] for x in r["ranking"]]
    assert sorted(ranking) == sorted(r["dev"]["0"]) and r["selected"]["name"] == ranking[0]
    minority = [x["minority"]["mean"] for x in r["ranking"]]
    assert [round(m, 1) for m in minority] == sorted((round(m, 1) for m in minority), reverse=True)
    chosen = tuple(r["selected"]["recipe"])
    expected = [DemoConfig.quick(0, "groups").recipe_variant(*x).name
                for x in select.test_recipes(chosen, select.BASELINE)]
    assert list(r["test"]["1"]) == expected
    assert set(r["test_summary"]["rows"]) == set(expected)
    assert set(r["test_summary"]["paired"]) == {f"{r['selected']['name']} - {n}" for n in expected
                                                if n != r["selected"]["name"]}
    assert r["dev"]["0"]["no feedback"]["time_vs_no_feedback"] == 1.0
    # both phases in: a rerun runs nothing
    monkeypatch.setattr(select, "run_demo", lambda *a, **k: pytest.fail("ran a seed already in the JSON"))
    select.main(args)
    assert json.loads(path.read_text())["priors"]["matched"]["test"] == r["test"]
    capsys.readouterr()
    monkeypatch.setattr(select, "QUICK", select.QUICK | {"test": (2,)})
    with pytest.raises(SystemExit, match="holds another protocol for prior matched: move it away to rerun"):
        select.main(args)
