"""Generate, then select: `fgds plan --oversample K` (exact job lists) and `fgds select` (by the recorded
criterion, at random, a mix; equal across a kill and resume; one-line errors), through the real CLI."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAFETY_NET
from test_plan import make_lt_folder
from test_production import STEPS, records

from fgds_engine.cli import main
from fgds_engine.plan import read_plan
from fgds_engine.production.select import SelectOptions, choose, read_selection

COUNTS = {"ant": 9, "bee": 5, "cat": 2, "dog": 1}  # target 9; deficits 1 (the minimum), 4, 7, 8
KEEP = {"ant": 1, "bee": 4, "cat": 7, "dog": 8}


def plan_k(tmp_path, name, *extra):
    data = tmp_path / "data"
    if not data.exists():
        make_lt_folder(data, COUNTS)
    out = tmp_path / name
    assert main(["plan", str(data), str(out), "--quiet", *extra]) == 0
    return out


def gen(out, *extra):
    return main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "4", *STEPS, *extra])


def test_oversample_gives_ceil_k_times_each_deficit_and_the_plan_s_jobs_first(tmp_path, capsys):
    base = read_plan(plan_k(tmp_path, "k1"))
    over = read_plan(plan_k(tmp_path, "k15", "--oversample", "1.5"))
    assert base.deficit == KEEP and base.keep == KEEP
    assert over.deficit == {"ant": 2, "bee": 6, "cat": 11, "dog": 12}  # ceil(1.5 x 1, 4, 7, 8): by hand
    assert over.keep == KEEP
    for c in COUNTS:  # the first deficit jobs of each class are the plan's without --oversample
        mine = [j for j in over.jobs if j.class_name == c]
        assert mine[:KEEP[c]] == [j for j in base.jobs if j.class_name == c]
    table = capsys.readouterr().out
    assert "synthetic     keep    total" in table and table.splitlines()[-2].split() == [
        "total", "4", "17", "31", "20", "37"]
    assert "oversample" not in json.loads((tmp_path / "k1" / "plan.json").read_text())["options"]
    assert json.loads((tmp_path / "k15" / "plan.json").read_text())["options"]["oversample"] == 1.5
    over2 = read_plan(plan_k(tmp_path, "k115", "--oversample", "1.1", "--target", "19"))
    assert over2.deficit["ant"] == 11  # 1.1 x 10 is 11.000000000000002 in floats: not 12


def test_oversample_below_1_is_one_line(tmp_path, capsys):
    make_lt_folder(tmp_path / "data", COUNTS)
    assert main(["plan", str(tmp_path / "data"), str(tmp_path / "o"), "--oversample", "0.5"]) == 2
    assert capsys.readouterr().err == "fgds: error: oversample must be >= 1.0, got 0.5\n"


@pytest.fixture(scope="module")
def oversampled(tmp_path_factory):
    """A run of the K = 2 plan (2, 8, 14, 16 jobs): the criterion recorded for every sample."""
    tmp = tmp_path_factory.mktemp("over")
    out = plan_k(tmp, "run", "--oversample", "2")
    assert gen(out) == 0
    return out


def test_select_by_criterion_keeps_the_highest_recorded_per_class(oversampled, tmp_path, capsys):
    to = tmp_path / "sel"
    assert main(["select", str(oversampled), "--to", str(to)]) == 0
    assert capsys.readouterr().out.startswith(f"kept 20 sample(s) of 4 class(es) by criterion in {to}")
    recs = records(oversampled)
    for c, n in KEEP.items():
        mine = sorted((r for r in recs if r["class"] == c), key=lambda r: (-r["criterion"], r["job_id"]))
        want = sorted(r["job_id"] for r in mine[:n])
        assert sorted(p.stem for p in (to / c).iterdir()) == want
        for p in (to / c).iterdir():  # links to the run's own images
            assert p.is_symlink() and p.read_bytes() == (oversampled / c / p.name).read_bytes()
    sel = read_selection(to)
    assert sel["criterion"] == "entropy" and sel["keep"] == KEEP
    from torchvision.datasets import ImageFolder

    assert len(ImageFolder(str(to))) == 20


def test_random_and_mix_selections(oversampled, tmp_path):
    def kept(*extra):
        to = tmp_path / f"sel{len(list(tmp_path.iterdir()))}"
        assert main(["select", str(oversampled), "--to", str(to), *extra]) == 0
        return read_selection(to)["kept"]

    r0, r0_again, r1 = kept("--by", "random"), kept("--by", "random"), kept("--by", "random", "--seed", "1")
    assert r0 == r0_again and r0 != r1
    assert all(len(r0[c]) == KEEP[c] for c in KEEP)
    top = kept("--by", "criterion", "--keep-per-class", "2")  # "ant" has 2 samples (K = 2 x 1)
    mix = kept("--by", "mix", "--mix", "0.5", "--keep-per-class", "2")
    recs = records(oversampled)
    for c in KEEP:
        best = [r["job_id"] for r in sorted((r for r in recs if r["class"] == c),
                                            key=lambda r: (-r["criterion"], r["job_id"]))]
        assert sorted(top[c]) == sorted(best[:2])
        assert best[0] in mix[c] and len(mix[c]) == 2  # floor(0.5 x 2) = 1 by criterion, 1 at random


def test_choose_on_records_by_hand():
    recs = {"a": [{"job_id": f"00000_00000{k}", "criterion": c} for k, c in enumerate([0.1, 0.9, 0.5, 0.9])]}
    assert [r["job_id"] for r in choose(recs, {"a": 2}, SelectOptions())["a"]] == ["00000_000001",
                                                                                "00000_000003"]
    mixed = choose(recs, {"a": 3}, SelectOptions(by="mix", mix=0.34))["a"]  # 1 by criterion, 2 at random
    assert "00000_000001" in [r["job_id"] for r in mixed] and len(mixed) == 3


def _start(out):
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), "--preset", "tiny-random",
           "--batch-size", "4", *STEPS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_selection_of_a_killed_and_resumed_twin_is_equal(oversampled, tmp_path):
    twin = plan_k(tmp_path, "twin", "--oversample", "2")
    proc = _start(twin)
    t0 = time.monotonic()
    while len(records(twin)) < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < SAFETY_NET
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert len(records(twin)) < 40, "the kill must land mid-run"
    assert gen(twin) == 0
    for by in ("criterion", "random", "mix"):
        a, b = tmp_path / f"a-{by}", tmp_path / f"b-{by}"
        assert main(["select", str(oversampled), "--to", str(a), "--by", by]) == 0
        assert main(["select", str(twin), "--to", str(b), "--by", by]) == 0
        assert read_selection(a)["kept"] == read_selection(b)["kept"]
        files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.glob("*/*"))}  # noqa: E731
        assert files(a) == files(b)


def test_a_killed_selection_is_completed_by_writing_it_again(oversampled, tmp_path):
    to = tmp_path / "sel"
    assert main(["select", str(oversampled), "--to", str(to)]) == 0
    whole = sorted(str(p.relative_to(to)) for p in to.glob("*/*"))
    for p in list(to.glob("cat/*"))[:3]:
        p.unlink()
    assert main(["select", str(oversampled), "--to", str(to)]) == 0
    assert sorted(str(p.relative_to(to)) for p in to.glob("*/*")) == whole


def test_select_from_webdataset_takes_the_files_out_of_the_tars(tmp_path):
    out = plan_k(tmp_path, "wds", "--oversample", "2")
    assert gen(out, "--format", "webdataset", "--samples-per-shard", "8") == 0
    to = tmp_path / "sel"
    assert main(["select", str(out), "--to", str(to), "--by", "random"]) == 0
    import tarfile

    members = {}
    for t in out.glob("*.tar"):
        with tarfile.open(t) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                        if m.name.endswith(".png")}
    got = {p.name: p.read_bytes() for p in to.glob("*/*.png")}
    assert len(got) == 20 and all(members[n] == data for n, data in got.items())


@pytest.mark.parametrize("argv, message", [
    (["--keep-per-class", "5"], "class 'ant' has 2 finished sample(s) in {out}, fewer than the 5 to keep "
     "(1 class(es) short): generate the rest first (fgds status {out}), or keep fewer (--keep-per-class)"),
    (["--by", "loss"], "the run in {out} recorded the criterion 'entropy', not 'loss': select --by entropy "
     "(or criterion), or generate with --criterion loss"),
    (["--by", "best"], "--by must be one of criterion, loss, entropy, hardness, random, mix, got 'best'"),
    (["--mix", "0.3"], "--mix is for --by mix"),
    (["--keep-per-class", "-1"], "keep_per_class must be >= 0, got -1"),
])
def test_bad_selections_are_one_line_and_write_nothing(oversampled, tmp_path, capsys, argv, message):
    to = tmp_path / "sel"
    assert main(["select", str(oversampled), "--to", str(to), *argv]) == 2
    assert capsys.readouterr().err == f"fgds: error: {message.format(out=oversampled)}\n"
    assert not to.exists()


def test_select_refuses_another_selection_an_ungenerated_run_and_overlapping_folders(oversampled, tmp_path,
                                                                                     capsys):
    to = tmp_path / "sel"
    assert main(["select", str(oversampled), "--to", str(to)]) == 0
    assert main(["select", str(oversampled), "--to", str(to), "--by", "random"]) == 2
    assert capsys.readouterr().err.endswith(f"fgds: error: {to} holds another selection "
                                            f"({to / 'selection.json'}): select into another folder, or "
                                            "remove it\n")
    empty = plan_k(tmp_path, "empty")
    assert main(["select", str(empty)]) == 2
    assert capsys.readouterr().err == (f"fgds: error: {empty} holds no run: generate it first (fgds "
                                       f"generate {empty})\n")
    assert main(["select", str(oversampled), "--to", str(oversampled / "sel")]) == 2
    assert "is inside OUT" in capsys.readouterr().err
    gone = plan_k(tmp_path, "gone", "--oversample", "2")  # a run whose images are elsewhere (--upload)
    assert gen(gone) == 0
    for p in gone.glob("dog/*.png"):
        p.unlink()
    capsys.readouterr()
    assert main(["select", str(gone), "--to", str(tmp_path / "g"), "--by", "random"]) == 2
    assert re.fullmatch(rf"fgds: error: {re.escape(str(gone))}/dog/00003_\d{{6}}\.png is recorded but not "
                        r"there: fgds select reads the run's images from its folder \(a run written with "
                        r"--upload keeps them in its store\); nothing was written\n", capsys.readouterr().err)
    assert not (tmp_path / "g").exists()
    assert not os.path.exists(oversampled / "sel")
    assert Path(f"{oversampled}-selected").exists() is False
