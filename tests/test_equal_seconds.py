"""The equal-seconds experiment (benchmarks/experiments/equal_seconds.py): its subsets and its rule by hand,
and one seed of the quick groups demo on a reduced grid end to end (rows, images, seconds, resume, a JSON of
another grid refused). No verdict depends on timing: seconds are checked as images x a measured rate."""

import json

import pytest
import torch
from conftest import load_script

eqs = load_script("benchmarks/experiments/equal_seconds.py")


def test_subsets_by_hand():
    ys = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    score = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.2, 0.8])
    assert eqs.first(ys, {0: 2, 1: 1}).tolist() == [0, 1, 4]
    # class 0: pool of the first 3 (0.1, 0.9, 0.5) keeps 2 -> jobs 1, 2; class 1: pool 3 keeps 1 -> job 6
    assert eqs.ranked(ys, score, {0: 3, 1: 3}, {0: 2, 1: 1}).tolist() == [1, 2, 6]
    assert eqs.ranked(ys, score, {0: 4, 1: 3}, {0: 2, 1: 1}).tolist() == [1, 3, 6]  # a tie: the earlier job
    mix = eqs.mixed(ys, score, {0: 4, 1: 3}, {0: 2, 1: 2}, seed=0).tolist()
    assert {1, 6} <= set(mix) and len(mix) == 4  # floor(0.5 x 2) = 1 by score per class, 1 at random
    assert mix == eqs.mixed(ys, score, {0: 4, 1: 3}, {0: 2, 1: 2}, seed=0).tolist()


def test_the_rule_by_hand():
    def row(minority, seconds):
        return {"minority": minority, "seconds": seconds}

    seed = {"real only": row(0.5, 0.0), "unguided x1": row(0.80, 10), "unguided x2": row(0.90, 20),
            "unguided cfg 1.0 x2": row(0.85, 11), "select entropy K2": row(0.86, 21),
            "select loss K1.5": row(0.84, 15), "loss": row(0.84, 12), "entropy": row(0.83, 11),
            "loss + allocation": row(0.88, 12)}
    picked = eqs.rule({0: seed, 1: seed}, "groups")
    # the best selection by minority; the best feedback row; the best rival within loss's 12 s (unguided x2
    # and the selections cost more)
    assert picked == {"metric": "minority", "best_select": ["entropy", 2.0], "feedback": "loss + allocation",
                      "rival": "unguided cfg 1.0 x2"}
    # a tie that float32 sums 2e-8 apart (long-tail's development seeds) still goes to the cheaper row
    tie = seed | {"entropy + allocation": row(0.9777777989705403, 18.5), "loss + allocation":
                  row(0.9777777791023254, 17.8)}
    assert eqs.rule({0: tie}, "groups")["feedback"] == "loss + allocation"
    other = {"loss + allocation": row(0.86, 12), "unguided cfg 1.0 x2": row(0.85, 11)}
    d = eqs.paired({0: seed, 1: seed | other}, "loss + allocation", "unguided cfg 1.0 x2", ["minority"])
    assert d["minority"]["values"] == pytest.approx([3.0, 1.0]) and d["minority"]["above"] == 2
    # a worst-5 mean summed in another order (the matched prior's seed 23: -1.19e-06 points) is equal
    near = {0: {"a": {"worst5": 0.5920000076293945}, "b": {"worst5": 0.5920000195503235}}}
    d = eqs.paired(near, "a", "b", ["worst5"])["worst5"]
    assert (d["above"], d["equal"], d["below"], d["values"]) == (0, 1, 0, [0.0])


def test_one_quick_seed_end_to_end(tmp_path, monkeypatch):
    """A reduced grid (K_MAX 2, one selection criterion and the mix at K = 2) on dev seed 0 of the quick
    groups demo (6 images per class: B = 60)."""
    monkeypatch.setattr(eqs, "K_MAX", 2)
    monkeypatch.setattr(eqs, "MORE", {"unguided": (1, 2), "unguided cfg 1.0": (1, 2)})
    monkeypatch.setattr(eqs, "SELECT", ("entropy", "mix"))
    monkeypatch.setattr(eqs, "SELECT_K", (2,))
    monkeypatch.setattr(eqs, "GRID", eqs.GRID | {"k_max": 2})
    out, path = tmp_path / "runs", tmp_path / "eqs.json"
    argv = ["--setting", "groups-milder", "--quick", "--seeds", "0", "--out", str(out), "--json", str(path)]
    assert eqs.main(argv) == 0
    rows = json.loads(path.read_text())["seeds"]["0"]
    assert list(rows) == ["real only", "unguided x1", "unguided x2", "unguided cfg 1.0 x1",
                          "unguided cfg 1.0 x2", "select entropy K2", "select mix K2", "allocation", "loss",
                          "loss + allocation", "entropy", "entropy + allocation"]
    images = {r: v["images"] for r, v in rows.items()}
    assert images == {"real only": 0, "unguided x1": 60, "unguided x2": 120, "unguided cfg 1.0 x1": 60,
                      "unguided cfg 1.0 x2": 120, "select entropy K2": 60, "select mix K2": 60,
                      "allocation": 60, "loss": 60, "loss + allocation": 60, "entropy": 60,
                      "entropy + allocation": 60}
    rate = rows["unguided x1"]["seconds"] / 60
    assert rows["unguided x2"]["seconds"] == pytest.approx(120 * rate)  # images x the sampler's rate
    assert rows["select entropy K2"]["generated"] == 120
    assert rows["select entropy K2"]["seconds"] > rows["unguided x2"]["seconds"]  # + the scoring passes
    assert all(0 <= v["minority"] <= 1 for v in rows.values())
    runs = json.loads(path.read_text())["runs"]
    assert list(runs) == ["0"] and len(runs["0"]) == 1  # one run of seed 0, stamped
    assert set(runs["0"][0]) == {"commit", "machine", "wall_s"} and runs["0"][0]["wall_s"] > 0
    assert runs["0"][0]["commit"] == eqs.LOADED  # the code the process loaded, not HEAD when the seed ran
    before = path.read_bytes()
    monkeypatch.setattr(eqs, "run_seed", lambda *a, **k: pytest.fail("a finished seed ran again"))
    assert eqs.main(argv) == 0 and path.read_bytes() == before  # resumed: nothing to do
    monkeypatch.setattr(eqs, "GRID", eqs.GRID | {"k_max": 3})
    assert eqs.main(argv) == 2  # a JSON of another grid is refused


def test_the_declared_order_dev_rule_then_test(tmp_path, monkeypatch):
    """main's flow with run_seed faked (no model trains): test seeds are refused before the development seeds
    have picked; once they have, the rule is applied, the development seeds rerun with the picked selection,
    the test seeds run with it, and the paired differences are the per-seed differences by hand."""
    calls = []

    def fake(setting, seed, quick, out, best_select=None):
        calls.append((seed, best_select))
        up = seed / 1000  # the feedback row gains 0.1 point per seed over the rival
        rows = {"real only": (0.90, 0), "unguided x1": (0.93, 10), "unguided cfg 1.0 x2": (0.95, 9),
                "select mix K4": (0.96, 40), "select loss K2": (0.94, 20), "allocation": (0.92, 10),
                "loss": (0.94 + up, 12), "loss + allocation": (0.93, 12)}
        if best_select:
            rows[f"loss + select {best_select[0]} K{best_select[1]:g}"] = (0.97, 48)
        return {r: {"minority": m, "worst5": m, "worst_group": m, "overall": m, "seconds": t, "images": 1}
                for r, (m, t) in rows.items()}

    monkeypatch.setattr(eqs, "run_seed", fake)
    path = tmp_path / "eqs.json"
    base = ["--setting", "groups-milder", "--out", str(tmp_path), "--json", str(path)]
    assert eqs.main(base + ["--seeds", "0", "20"]) == 2  # seed 0 ran; 20 waits for the pick
    assert calls == [(0, None)]
    assert eqs.main(base + ["--seeds", "1", "2"]) == 0  # 1, 2, the rule, the development reruns
    assert calls[1:] == [(1, None), (2, None)] + [(s, ("mix", 4.0)) for s in (0, 1, 2)]
    picked = json.loads(path.read_text())["rule"]
    assert eqs.main(base) == 0  # another run: the test seeds, with the rule the first run wrote
    assert calls[6:] == [(s, ("mix", 4.0)) for s in (20, 21, 22, 23, 24)]
    out = json.loads(path.read_text())
    assert out["rule"] == picked  # kept by every later write (a run that lost it would pick again)
    assert out["rule"] == {"metric": "minority", "best_select": ["mix", 4.0], "feedback": "loss",
                           "rival": "unguided cfg 1.0 x2"}
    assert "loss + select mix K4" in out["seeds"]["20"]
    # loss minus the rival per test seed: 0.94 + s/1000 - 0.95 -> -1.0 + s/10 points: +1.0 ... +1.4
    d = out["paired"]["minority"]
    assert d["values"] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4]) and (d["above"], d["below"]) == (5, 0)
    assert out["paired_at_b"]["minority"]["values"] == pytest.approx([3.0, 3.1, 3.2, 3.3, 3.4])
    assert [len(out["runs"][str(s)]) for s in (0, 1, 2, 20, 24)] == [2, 2, 2, 1, 1]
    assert (tmp_path / "eqs.png").stat().st_size > 0
    monkeypatch.setattr(eqs, "run_seed", lambda *a, **k: pytest.fail("a finished seed ran again"))
    assert eqs.main(base) == 0 and json.loads(path.read_text()) == out  # the same JSON again (same commit)
    # the rule again on the development rows, which now hold the combined rows: those are not candidates
    assert eqs.rule({s: out["seeds"][str(s)] for s in (0, 1, 2)}, "groups") == picked


def test_the_chart_tells_every_family_apart(monkeypatch):
    """The milder prior's committed rows (13 families): no two families share a colour, and "real only" is
    in the legend once."""
    from pathlib import Path

    from conftest import ROOT

    from fgds_engine.demo import charts

    seen = []
    monkeypatch.setattr(charts, "_save", lambda fig, path: seen.append(fig))
    result = ROOT / "benchmarks/results/bench_demo_equal_seconds-groups-milder-cpu.json"
    payload = json.loads(result.read_text())
    rows = {s: payload["seeds"][s] for s in ("20", "21", "22", "23", "24")}
    charts.equal_seconds(Path("unused.png"), rows, "minority", "t", picked=payload["rule"])
    lines = [ln for ln in seen[0].axes[0].get_lines() if not ln.get_label().startswith("_")]
    colours = [ln.get_color() for ln in lines if ln.get_label() != "real only"]
    assert len(colours) == 13 and len(set(colours)) == 13
    assert [ln.get_label() for ln in lines].count("real only") == 1


def test_the_stamp_is_the_loaded_commit_dirty_when_tracked_files_differ(tmp_path, monkeypatch):
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("not the code")
    assert eqs.loaded() == head
    (tmp_path / "f.py").write_text("a = 2\n")
    assert eqs.loaded() == head + "-dirty"
