"""The groups demo: colored-digit data built exactly as specified, the stroke-color measure, the group
metrics, and the quick run end to end (deterministic). The long-tail demo's run is tested in test_train.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_script

from fgds_engine.demo import (
    BETWEEN,
    COLORS,
    EMPTY,
    PALETTE,
    DemoConfig,
    apportion,
    color_report,
    colorize,
    group_metrics,
    load_digits16,
    make_group_data,
    stroke_colors,
)
from fgds_engine.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return load_digits16()


def test_apportion_is_exact():
    assert apportion(124, 0.9, 0) == [112, 4, 4, 4]
    assert apportion(130, 0.9, 2) == [4, 4, 117, 5]  # 13 others: one extra after the majority
    assert apportion(128, 0.55, 3) == [20, 19, 19, 70]  # round(70.4) = 70; 58 others: 20 to color 0
    assert apportion(10, 1.0, 1) == [0, 10, 0, 0]


@pytest.mark.parametrize("prior,share", [("matched", 0.9), ("milder", 0.55)])
def test_group_data_counts_skews_and_test_balance(digits, prior, share):
    x, y = digits
    data = make_group_data(x, y, DemoConfig.groups(0, prior))
    pool_sizes = torch.bincount(y, minlength=10) - 50
    n_clf = int(pool_sizes.min())
    assert n_clf == 124
    # test: 50 digits per class, each in all four colors: every one of the 40 groups has exactly 50 images
    xt, yt, ct = data.test
    assert xt.shape == (2000, 3, 16, 16)
    assert torch.equal(torch.bincount(yt * 4 + ct, minlength=40), torch.full((40,), 50))
    # classifier: classes balanced (124 each), the digit's majority color d mod 4 on 112, 4 on each other
    _, yc, cc = data.classifier
    for d in range(10):
        got = torch.bincount(cc[yc == d], minlength=4).tolist()
        assert got == apportion(124, 0.9, d % 4) and got[d % 4] == 112
    # generator: every non-test digit, colors at the prior's share, class by class
    _, yg, cg = data.generator
    assert len(yg) == len(y) - 500
    for d in range(10):
        got = torch.bincount(cg[yg == d], minlength=4).tolist()
        assert got == apportion(int(pool_sizes[d]), share, d % 4)
    majority = sum(int(((yg == d) & (cg == d % 4)).sum()) for d in range(10))
    assert majority / len(yg) == pytest.approx(share, abs=0.005)
    # oracle: every non-test digit in every color
    _, yo, co = data.oracle
    assert torch.equal(torch.bincount(co, minlength=4), torch.full((4,), len(yg)))
    # the test digits are held out of every other set; the classifier's digits are among the generator's
    test = set(data.digits["test"].tolist())
    for name in ("classifier", "generator", "oracle"):
        assert not test & set(data.digits[name].tolist()), name
    assert set(data.digits["classifier"].tolist()) <= set(data.digits["generator"].tolist())
    assert torch.equal(y[data.digits["test"]], yt)


def test_group_data_is_a_function_of_the_seed(digits):
    x, y = digits
    a, b = (make_group_data(x, y, DemoConfig.groups(3)) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.classifier + a.test, b.classifier + b.test))
    c = make_group_data(x, y, DemoConfig.groups(4))
    assert not torch.equal(a.digits["test"], c.digits["test"])


def test_stroke_colors_of_images_of_known_color(digits):
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    gray = x[:400]
    colors = torch.arange(400) % 4
    img = colorize(gray, colors, 0.08, g)
    assert torch.equal(stroke_colors(img), colors)
    # brightness drops out: a dimmer stroke keeps its color
    dim = (img + 1) * 0.6 - 1
    assert torch.equal(stroke_colors(dim), colors)
    # halfway between two palette colors: between (red-blue is magenta, red-yellow is orange)
    pal = {k: torch.tensor(v) for k, v in PALETTE.items()}
    for a, b in (("red", "blue"), ("red", "yellow"), ("green", "blue")):
        mix = ((gray[:20] + 1) / 2 * ((pal[a] + pal[b]) / 2)[None, :, None, None]) * 2 - 1
        assert (stroke_colors(mix) == BETWEEN).all(), (a, b)
        assert (stroke_colors(mix, margin=float("inf")) < BETWEEN).all()  # but always has a nearest color
    # white strokes sit between too; a black image or a faint one has no stroke
    white = gray[:5].expand(-1, 3, -1, -1)
    assert (stroke_colors(white) == BETWEEN).all()
    assert (stroke_colors(torch.full((3, 3, 16, 16), -1.0)) == EMPTY).all()
    assert (stroke_colors(torch.full((3, 3, 16, 16), -0.5)) == EMPTY).all()  # 0.25 < the 0.35 threshold


def test_color_report_and_group_metrics_on_a_hand_made_case():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    colors = torch.tensor([0, 1, BETWEEN, 1, EMPTY, 3])  # majority colors: 0 -> red, 1 -> green, 2 -> blue
    r = color_report(labels, colors)
    assert r["minority_share"] == pytest.approx(2 / 6)  # digit 0 in green, digit 2 in yellow
    assert r["between_share"] == pytest.approx(1 / 6) and r["empty_share"] == pytest.approx(1 / 6)
    assert r["histogram"][0] == {"red": 1, "green": 1, "blue": 0, "yellow": 0, "between": 1, "empty": 0}
    assert r["histogram"][1]["green"] == 1 and r["histogram"][1]["empty"] == 1

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    colors = torch.tensor([0, 0, 2, 2, 1, 1, 3, 3])
    preds = torch.tensor([0, 0, 0, 5, 1, 1, 0, 0])
    m = group_metrics(preds, labels, colors)
    assert m["overall"] == pytest.approx(5 / 8)
    assert m["majority"] == pytest.approx(1.0) and m["minority"] == pytest.approx(1 / 4)
    assert m["worst_group"] == 0.0 and m["worst_group_name"] == f"1 {COLORS[3]}"
    assert m["per_group"] == {"0 red": 1.0, "0 blue": 0.5, "1 green": 1.0, "1 yellow": 0.0}


def test_bad_settings_are_one_line_errors(capsys):
    from fgds_engine.cli import main

    with pytest.raises(InputError, match="^setting must be one of long-tail, groups, got 'tail'$"):
        DemoConfig(setting="tail")
    with pytest.raises(InputError, match="^color prior must be one of matched, milder, got 'flat'$"):
        DemoConfig.groups(0, "flat")
    assert main(["demo", "--prior", "milder"]) == 2
    assert capsys.readouterr().err.strip() == "fgds: error: --prior is an option of --setting groups"


def test_groups_demo_quick_end_to_end_and_deterministic(groups_quick, tmp_path, capsys):
    import shutil

    from fgds_engine.cli import main

    shutil.copytree(groups_quick[0], tmp_path / "a")  # what one cold run wrote
    out = groups_quick[1]
    variants = ["no feedback", "loss", "entropy", "hardness", "entropy x0"]
    for row in ["real only"] + variants:
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "worst group" in out and "nearest palette color of the strokes per digit" in out
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert list(m["accuracy"]) == ["real only"] + variants and list(m["samples"]) == variants
    assert m["train_groups"]["0"] == {"red": 112, "green": 4, "blue": 4, "yellow": 4}
    for v in variants:
        s = m["samples"][v]
        assert s["generated_now"] == 60 and sum(sum(h.values()) for h in s["histogram"].values()) == 60
        assert s["seconds_per_image"] > 0 and s["generation_seconds_per_image"] > 0
        assert sum(sum(h.values()) for h in s["nearest"]["histogram"].values()) == 60
        assert s["nearest"]["between_share"] == 0 and s["nearest"]["minority_share"] >= s["minority_share"]
        a = m["accuracy"][v]
        assert len(a["per_group"]) == 40 and a["worst_group"] == min(a["per_group"].values())
    assert m["samples"]["no feedback"]["time_vs_no_feedback"] == 1.0
    assert m["samples"]["entropy x0"]["grad_path"] == "x0"
    for name in ["accuracy.png"] + [f"samples-{v.replace(' ', '-')}.png" for v in variants]:
        assert (tmp_path / "a" / name).stat().st_size > 0
    from PIL import Image

    with Image.open(tmp_path / "a" / "samples-no-feedback.png") as im:
        assert im.mode == "RGB" and im.size == (10 * 66 + 2, 10 * 66 + 2)  # 10 x 10 tiles of 64 + padding
    # a cold rerun elsewhere gives the same numbers (everything but the timings)
    assert main(["demo", "--setting", "groups", "--quick", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    strip = lambda s: {v: {k: x for k, x in d.items() if "seconds" not in k and "time" not in k}  # noqa: E731
                       for v, d in s.items()}
    assert m2["accuracy"] == m["accuracy"] and strip(m2["samples"]) == strip(m["samples"])
    gen = lambda g: {k: v for k, v in g.items() if k != "training"}  # noqa: E731  (its seconds differ)
    assert gen(m2["generator"]) == gen(m["generator"])
    assert m2["generator"]["training"]["loss_curve"] == m["generator"]["training"]["loss_curve"]


def test_a_generator_below_the_gate_is_flagged_in_the_log_and_the_metrics(groups_quick):
    """The quick run's generator (40 training steps) cannot draw digits: the run measures it before the
    variants, says so under the tables and records it; its loss curve is kept with the cached weights."""
    folder, printed = groups_quick
    m = json.loads((folder / "metrics.json").read_text())["generator"]
    assert m["samples"] == 60 and m["passes"] is False
    assert m["gate"] == {"fidelity": 0.9, "between_share": 0.15}
    assert m["failed"] and all(re.fullmatch(r"fidelity \d+\.\d% < 90%|between share \d+\.\d% > 15%", f)
                               for f in m["failed"])
    assert abs(sum(m["palette_share"].values()) + m["between_share"] + m["empty_share"] - 1) < 1e-6
    assert m["prior_majority_share"] == 0.9 and set(m["train_palette_share"]) == {"red", "green", "blue",
                                                                                    "yellow"}
    assert len(m["training"]["loss_curve"]) == 1 and m["training"]["loss_window"] == 100
    lines = [line for line in printed.splitlines() if line.startswith("generator (60 unguided samples): ")]
    assert len(lines) == 2 and all("BELOW THE GATE (" in line for line in lines)  # before the runs and under
    assert printed.rindex(lines[1]) > printed.index("nearest palette color of the strokes per digit")


def test_the_gate_verdict():
    from fgds_engine.demo.gate import generator_line, verdict

    assert verdict({"fidelity": 0.9, "between_share": 0.15}) == {
        "gate": {"fidelity": 0.9, "between_share": 0.15}, "passes": True, "failed": []}
    assert verdict({"fidelity": 0.899, "between_share": 0.2})["failed"] == [
        "fidelity 89.9% < 90%", "between share 20.0% > 15%"]
    assert verdict({"fidelity": 0.95})["passes"]  # long-tail: fidelity only
    m = {"samples": 300, "fidelity": 0.95, "between_share": 0.05, "majority_share": 0.88,
         "prior_majority_share": 0.9}
    assert generator_line(m | verdict(m)) == (
        "generator (300 unguided samples): fidelity 95.0%, between 5.0%, majority color 88.0% (prior 90%); "
        "passes the gate")


def test_generator_bench_quick_measures_as_the_demo_does(groups_quick, tmp_path, capsys):
    """benchmarks/experiments/generator.py on the quick demo's cache: seed 0's measure is the demo's own (the
    same generator, oracle and samples); a rerun runs nothing; a recipe name is bound to its overrides."""
    import shutil

    bench_demo_generator = load_script("benchmarks/experiments/generator.py")

    cache = tmp_path / "out" / "demo" / "seed0" / "cache"
    shutil.copytree(groups_quick[0] / "cache", cache)
    cached = sorted(p.name for p in cache.iterdir())
    path = tmp_path / "g.json"
    args = ["--quick", "--seeds", "0", "--out", str(tmp_path / "out"), "--json", str(path)]
    bench_demo_generator.main(args)
    r = json.loads(path.read_text())
    row = r["recipes"]["demo"]["rows"]["0"]
    demo = json.loads((groups_quick[0] / "metrics.json").read_text())["generator"]
    same = lambda m: {k: v for k, v in m.items() if k not in ("training", "seconds", "denoising")}  # noqa
    assert same(row) == same(demo) and row["training"]["loss_curve"] == demo["training"]["loss_curve"]
    assert row["denoising"]["timesteps"] == [40, 200, 400, 600, 800, 950]
    assert len(row["denoising"]["x0_mse"]) == 6
    assert r["recipes"]["demo"]["summary"]["below_gate"] == [0] and r["quick"] is True
    assert sorted(p.name for p in cache.iterdir()) == cached  # nothing trained: the demo's keys
    before = path.read_text()
    bench_demo_generator.main(args)  # every seed is in: nothing runs, the JSON is kept
    assert json.loads(path.read_text())["recipes"] == json.loads(before)["recipes"]
    # a row measured before the x0 errors were kept gets them from its cache, the rest of it as it was; a
    # recipe written into the file meanwhile (another run beside this one) stays
    r["recipes"]["demo"]["rows"]["0"] = {k: v for k, v in row.items() if k != "denoising"}
    r["recipes"]["other"] = {"overrides": {"gen_lr": 0.001}, "rows": {}}
    path.write_text(json.dumps(r))
    bench_demo_generator.main(args)
    r2 = json.loads(path.read_text())
    assert r2["recipes"]["demo"]["rows"]["0"] == row and r2["recipes"]["other"] == r["recipes"]["other"]
    bench_demo_generator.main(args + ["--probe"])  # the sampler probes join the row, the rest stays
    row3 = json.loads(path.read_text())["recipes"]["demo"]["rows"]["0"]
    assert {k: v for k, v in row3.items() if k != "probe"} == row
    assert list(row3["probe"]) == ["clip off", "clip on", "cfg 1.0", "cfg 3.0", "100 steps",
                                  "leading spacing"]
    assert all(set(m) == {"fidelity", "between_share", "majority_share", "passes"} and 0 <= m["fidelity"] <= 1
               for m in row3["probe"].values())
    # a probe added since the row was measured is measured now, and only it: the same numbers as before
    r3 = json.loads(path.read_text())
    r3["recipes"]["demo"]["rows"]["0"]["probe"].pop("clip on")
    path.write_text(json.dumps(r3))
    bench_demo_generator.main(args + ["--probe"])
    assert json.loads(path.read_text())["recipes"]["demo"]["rows"]["0"] == row3
    bench_demo_generator.main(args + ["--time-steps", "2"])  # the training cost against epsilon's
    cost = json.loads(path.read_text())["recipes"]["demo"]["step_seconds"]
    assert cost["steps"] == 2 and cost["ratio"] == pytest.approx(cost["recipe"] / cost["epsilon"])
    with pytest.raises(SystemExit, match="--probe changes the DDIM sampler: not for a flow generator"):
        bench_demo_generator.main(args + ["--probe", "--recipe", "flow", "--set", "objective=flow"])
    with pytest.raises(SystemExit, match="recipe 'demo' was run with {}: name this one otherwise"):
        bench_demo_generator.main(args + ["--set", "gen_lr=0.001"])


def test_quality_bench_groups_quick(groups_quick, tmp_path):
    """The 3-seed bench's groups mode, shrunk: one seed, the matched prior, one extra scale. Its seed folder
    starts from the quick demo's (the same configuration but the extra scale: its cache serves every stage
    but that variant, as a rerun of the bench would)."""
    import shutil

    bench_demo_quality = load_script("benchmarks/experiments/quality.py")

    shutil.copytree(groups_quick[0] / "cache", tmp_path / "out" / "seed0" / "matched" / "cache")
    path = tmp_path / "r.json"
    bench_demo_quality.main(["--setting", "groups", "--quick", "--seeds", "0", "--priors", "matched",
                             "--scales", "0.3", "--out", str(tmp_path / "out"), "--json", str(path)])
    r = json.loads(path.read_text())
    rows = r["summary"]["matched"]
    assert list(rows) == ["real only", "no feedback", "loss", "entropy", "hardness", "entropy x0",
                          "entropy 0.3"]
    run = json.loads((tmp_path / "out" / "seed0" / "matched" / "metrics.json").read_text())
    assert rows["loss"]["worst_group"]["values"] == [100 * run["accuracy"]["loss"]["worst_group"]]
    assert rows["entropy"]["nearest_minority_share"]["values"] == [
        100 * run["samples"]["entropy"]["nearest"]["minority_share"]]
    assert rows["no feedback"]["histogram"] == run["samples"]["no feedback"]["histogram"]  # one seed: itself
    assert sum(sum(h.values()) for h in rows["loss"]["nearest_histogram"].values()) == 60
    assert [p["scale"] for p in r["curve"]["points"]] == [0.0, 0.03, 0.3]
    assert [p["variant"] for p in r["curve"]["points"]] == ["no feedback", "entropy", "entropy 0.3"]
    for suffix in ("-scale-curve.png", "-samples.png"):
        assert (tmp_path / f"r{suffix}").stat().st_size > 0


@pytest.mark.parametrize("objective, scheduler, prediction", [
    ("flow", "FlowMatchEulerDiscreteScheduler", "flow"), ("v", "DDIMScheduler", "v_prediction")])
def test_the_other_objectives_train_sample_and_keep_the_ddpm_keys(objective, scheduler, prediction):
    """The rectified-flow generator (benchmarks/experiments/flow.py) and the v-prediction one (the groups
    demo's): their scheduler, a few training steps, the engine samples them with feedback (finite images); the
    epsilon runs' cache keys are the ones that predate the objective, so their cached results still
    reproduce."""
    from fgds_engine.demo.models import SmallCNN, make_generator, train_generator
    from fgds_engine.demo.sampling import objective_key, sample_key, variant_sampler

    with pytest.raises(InputError) as err:
        DemoConfig(objective="edm")
    assert str(err.value) == "objective must be one of ddpm, v, flow, got 'edm'"
    assert "objective" not in sample_key(DemoConfig()) and objective_key(DemoConfig()) == {}
    # the groups demo trains with v prediction (its epsilon generator missed the gate), long-tail with epsilon
    assert DemoConfig.groups(0).objective == "v" and DemoConfig().objective == "ddpm"
    # ... and samples it without clipping the x0 estimate (clipping is what epsilon needs, and v is hurt by);
    # the key of a clipping run's samples is the one from before the field
    assert not DemoConfig.groups(0).clip_sample and DemoConfig().clip_sample
    assert not make_generator(DemoConfig.quick(0, "groups"))[1].config.clip_sample
    assert make_generator(DemoConfig.quick(0))[1].config.clip_sample
    assert "clip_sample" not in sample_key(DemoConfig.groups(0, clip_sample=True))
    assert sample_key(DemoConfig.groups(0))["clip_sample"] is False
    assert "clip_sample" not in sample_key(DemoConfig.groups(0, objective="flow"))  # no DDIM to clip
    from dataclasses import replace

    cfg = replace(DemoConfig.quick(0, objective=objective), gen_steps=3, gen_batch=8)
    assert sample_key(cfg)["objective"] == objective and objective_key(cfg) == {"objective": objective}
    unet, sched = make_generator(cfg)
    assert type(sched).__name__ == scheduler
    x, y = torch.rand(16, 1, 16, 16) * 2 - 1, torch.arange(16) % 10
    before = [p.clone() for p in unet.parameters()]
    train_generator(unet, sched, x, y, cfg, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    variant = next(v for v in cfg.variants() if v.criterion == "entropy")
    sampler = variant_sampler(unet, sched, SmallCNN(channels=1).eval(), cfg, variant, None)
    assert sampler.solver.prediction_type == prediction and sampler.feedback_mode == "shift"
    from fgds_engine.conditioning import Conditioning

    labels = torch.tensor([1, 2])
    out = sampler.sample(Conditioning(class_labels=labels, negative_class_labels=torch.full_like(labels, 10)),
                         labels, [0, 1])
    assert out.images.shape == (2, 1, 16, 16) and not out.nan.any()


@pytest.mark.parametrize("objective", ["ddpm", "v", "flow"])
def test_denoising_error_is_the_x0_error_each_prediction_makes_of_an_output_error(objective):
    """A fake generator that knows the clean image (one image per digit) and errs by delta on every output
    value: the x0 error per noise level is delta^2 times the factor each prediction type puts on it, (1 - a)
    / a for epsilon (about 660 at t = 800), 1 - a for v, s^2 for flow; the digit's mean image is exact."""
    from diffusers import DDIMScheduler

    from fgds_engine.demo.gate import denoising_error
    from fgds_engine.demo.models import make_generator
    from fgds_engine.ops.formulas import join_prediction, noise_coefficients

    cfg = DemoConfig.quick(0, "groups", objective=objective)
    _, sched = make_generator(cfg)
    ptype = "flow" if objective == "flow" else sched.config.prediction_type
    digits = torch.rand(10, 3, 16, 16) * 2 - 1
    y = torch.arange(40) % 10
    acp = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    delta, timesteps = 0.01, (40, 400, 800)
    levels = iter(timesteps)

    def unet(xt, step, class_labels):  # called once per level, in order: it knows the level's alpha-bar
        a = acp[next(levels)]
        alpha, sigma = noise_coefficients(a, ptype, xt)
        x0 = digits[class_labels]
        return type("Out", (), {"sample": join_prediction(x0, (xt - alpha * x0) / sigma, a, ptype) + delta})

    d = denoising_error(unet, sched, digits[y], y, cfg, n=40, timesteps=timesteps)
    assert d["timesteps"] == [40, 400, 800] and d["class_mean_mse"] == 0.0
    for t, err in zip(timesteps, d["x0_mse"]):
        a = float(acp[t])
        s = float(noise_coefficients(torch.tensor(a), "flow", torch.zeros(1))[1])
        factor = {"ddpm": (1 - a) / a, "v": 1 - a, "flow": s * s}[objective]
        assert err == pytest.approx(delta ** 2 * factor, rel=1e-3), (t, err)


def test_grid_json_keeps_the_setting_it_did_not_rerun():
    """benchmarks' demo grids (schedulers, coverage): ``--settings groups`` replaces the groups block and
    keeps the long-tail one when the file holds the same seeds and budgets (a kept block from before blocks
    carried their commit gets the file's commit and note); other seeds or budgets keep nothing."""

    from fgds_engine.demo.experiment import merged

    old = {"seeds": [0, 1, 2], "quick": False, "commit": "30d12c0", "note": "old run",
           "long-tail": {"summary": {"a": 1}}, "groups": {"summary": {"b": 2}}}
    new = {"seeds": [0, 1, 2], "quick": False, "groups": {"summary": {"b": 3}, "commit": "abc"}}
    assert merged(old, new, ["groups"]) == new | {
        "long-tail": {"commit": "30d12c0", "note": "old run", "summary": {"a": 1}}}
    stamped = {**old, "long-tail": {"summary": {"a": 1}, "commit": "def"}}
    assert merged(stamped, new, ["groups"])["long-tail"]["commit"] == "def"
    assert merged(old, new | {"seeds": [0]}, ["groups"]) == new | {"seeds": [0]}
    assert merged(old, new | {"quick": True}, ["groups"]) == new | {"quick": True}
    assert merged({}, new, ["groups"]) == new
    both = new | {"long-tail": {"summary": {"a": 4}}}
    assert merged(old, both, ["groups", "long-tail"]) == both
