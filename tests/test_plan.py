"""ImageFolder scan, class-name map, deficits and the job list (fgds_engine.data, fgds_engine.plan)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgds_engine.data import load_class_names, safe_name, scan_imagefolder
from fgds_engine.errors import InputError
from fgds_engine.plan import PlanOptions, derive_seed, make_plan, read_plan, write_plan

COUNTS = {"ant": 9, "bee": 5, "cat": 2, "dog": 1}


def make_lt_folder(root, counts=COUNTS, seed=0, side=20):
    """A long-tailed ImageFolder of random images (png and jpg)."""
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            ext = "png" if k % 2 == 0 else "jpg"
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{k}.{ext}")
    return root


def test_scan_counts_and_order(tmp_path):
    root = make_lt_folder(tmp_path / "data")
    (root / "ant" / "notes.txt").write_text("not an image")
    scan = scan_imagefolder(root)
    assert scan.classes == ["ant", "bee", "cat", "dog"]
    assert scan.counts() == COUNTS and scan.skipped == []


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = make_lt_folder(tmp_path / "data")
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    scan = scan_imagefolder(root)
    assert scan.counts()["bee"] == 5
    assert [p for p, _ in scan.skipped] == ["bee/broken.png"]
    assert "skipped unreadable image bee/broken.png" in caplog.text


@pytest.mark.parametrize("setup,message", [
    (lambda r: None, "data folder {root} does not exist"),
    (lambda r: r.mkdir(), "no class folders in {root}: expected one sub-folder of images per class"),
    (lambda r: (make_lt_folder(r), (r / "emu").mkdir()),
     "class folder 'emu' in {root} has no images (.jpg/.jpeg/.png/.webp/.bmp)"),
    (lambda r: (make_lt_folder(r), (r / "emu").mkdir(), (r / "emu" / "x.png").write_bytes(b"nope")),
     "class folder 'emu' in {root} has no readable images"),
])
def test_bad_data_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(InputError) as err:
        scan_imagefolder(root)
    assert str(err.value) == message.format(root=root)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b"])
def test_unsafe_names_are_rejected(name):
    with pytest.raises(InputError, match="is not a plain folder or file name"):
        safe_name(name, "class name")


def test_class_name_map(tmp_path):
    classes = ["ant", "bee"]
    (tmp_path / "names.json").write_text(json.dumps({"ant": "red ant"}))
    assert load_class_names(tmp_path / "names.json", classes) == {"ant": "red ant", "bee": "bee"}
    (tmp_path / "names.txt").write_text("ant  fire ant\nbee honey bee\n")
    assert load_class_names(tmp_path / "names.txt", classes) == {"ant": "fire ant", "bee": "honey bee"}
    (tmp_path / "bad.json").write_text(json.dumps({"ant": "../../etc"}))
    with pytest.raises(InputError, match=re.escape("class name in the name map '../../etc' is not a plain")):
        load_class_names(tmp_path / "bad.json", classes)
    (tmp_path / "unknown.json").write_text(json.dumps({"yak": "yak"}))
    message = "names folders that are not classes of the data: ['yak']"
    with pytest.raises(InputError, match=re.escape(message)):
        load_class_names(tmp_path / "unknown.json", classes)


def test_deficits_jobs_and_determinism(tmp_path):
    scan = scan_imagefolder(make_lt_folder(tmp_path / "data"))
    plan = make_plan(scan, PlanOptions(run_seed=3))
    assert plan.target == 9
    assert plan.deficit == {"ant": 1, "bee": 4, "cat": 7, "dog": 8}  # the largest class still gets 1
    assert len(plan.jobs) == 20 and len({j.job_id for j in plan.jobs}) == 20
    dog = [j for j in plan.jobs if j.class_name == "dog"]
    assert {j.exemplar for j in dog} == {"dog/0.png"} and dog[0].prompt == "a photo of a dog"
    assert dog[0].seed == derive_seed(3, dog[0].job_id)
    assert make_plan(scan, PlanOptions(run_seed=3)).jobs == plan.jobs
    assert make_plan(scan, PlanOptions(run_seed=4)).jobs[0].seed != plan.jobs[0].seed
    cat_ex = {j.exemplar for j in plan.jobs if j.class_name == "cat"}
    assert cat_ex <= {"cat/0.png", "cat/1.jpg"} and len(cat_ex) == 2  # exemplars spread over the class
    capped = make_plan(scan, PlanOptions(target=5, min_per_class=0, prompt_template="{name}, photo"))
    assert capped.deficit == {"ant": 0, "bee": 0, "cat": 3, "dog": 4}
    assert capped.jobs[0].prompt == "cat, photo"


def test_derive_seed_is_pinned():
    """SHA-256 based: the same on every machine and Python version (a pinned value, not a rerun)."""
    assert derive_seed(0, "00000_000000") == 7723424095071178484  # sha256sum of "0:00000_000000"


def test_plan_round_trip_and_tampering(tmp_path):
    plan = make_plan(scan_imagefolder(make_lt_folder(tmp_path / "data")))
    out = write_plan(plan, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # the table, not the jobs
    back = read_plan(out)
    assert back.jobs == plan.jobs and back.options == plan.options and back.real == plan.real
    meta = json.loads((out / "plan.json").read_text())
    assert meta["format"] == 2 and meta["jobs"] == 20 and meta["files"]["cat"] == ["0.png", "1.jpg"]
    good = (out / "plan.json").read_bytes()
    cases = [  # (what is done to plan.json, the error's text)
        (lambda m: m | {"classes": ["ant", "bee", "..", "dog"]},
         "class name '..' is not a plain folder or file name"),
        (lambda m: m | {"deficit": m["deficit"] | {"cat": 8}}, "does not match its digest"),  # edited
        (lambda m: m | {"files": m["files"] | {"cat": ["1.jpg", "0.png"]}}, "does not match its digest"),
        (lambda m: m | {"format": 3}, "a plan of format 3, written by a newer release"),
        (lambda m: {k: v for k, v in m.items() if k != "files"}, "is damaged (cut short or edited?)"),
    ]
    for edit, message in cases:
        (out / "plan.json").write_text(json.dumps(edit(json.loads(good))))
        with pytest.raises(InputError, match=re.escape(message)):
            read_plan(out)
    (out / "plan.json").write_bytes(good[:len(good) // 2])  # cut short
    with pytest.raises(InputError, match=re.escape(f"{out / 'plan.json'} is damaged (cut short or edited?): "
                                                   f"plan again with `fgds plan DATA {out}`")):
        read_plan(out)
    with pytest.raises(InputError, match="no plan in"):
        read_plan(tmp_path / "elsewhere")


def test_jobs_are_those_of_the_previous_release_plan():
    """The job table computes, for the same folder and options, exactly the jobs the previous release wrote
    to jobs.jsonl (ids, seeds, exemplars, prompts), and that plan still reads, as a list."""
    fixture = Path(__file__).parent / "fixtures" / "previous-release"
    old = read_plan(fixture / "out")
    assert isinstance(old.jobs, list) and len(old.jobs) == 13
    new = make_plan(scan_imagefolder(fixture / "data"))
    assert list(new.jobs) == old.jobs and new.job_list_digest() == old.digest()
    assert [new.index(j.job_id) for j in old.jobs] == list(range(13))
    assert new.jobs[-1] == old.jobs[-1] and new.jobs[3:6] == old.jobs[3:6]
    with pytest.raises(ValueError, match="is not a job id of this plan"):
        new.index("00001_000003")  # bee has 3 jobs: 0..2


def test_a_plan_of_ten_million_jobs_holds_no_job(tmp_path):
    """1,000 classes x 10,000 jobs: the plan in memory and plan.json hold the classes and the file table,
    not the jobs (one job record each would be over a gigabyte in memory and hundreds of MB on disk); a job
    is computed on demand."""
    import tracemalloc

    from fgds_engine.data import ImageFolderScan

    classes = [f"c{i:04d}" for i in range(1000)]
    scan = ImageFolderScan(Path("/nowhere"), classes, {c: [f"{k}.png" for k in range(3)] for c in classes})
    tracemalloc.start()
    plan = make_plan(scan, PlanOptions(target=10_003))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(plan.jobs) == 10_000_000
    assert held < 5 * 2**20, held  # measured: 0.36 MB (the file table and per-class arrays)
    size = (write_plan(plan, tmp_path) / "plan.json").stat().st_size
    assert size < 2**20, size  # measured: 0.12 MB
    assert read_plan(tmp_path).jobs[9_999_999] == plan.jobs[9_999_999]
    j = plan.jobs[9_999_999]
    assert (j.job_id, j.class_index, j.seed) == ("00999_009999", 999, derive_seed(0, "00999_009999"))
    assert plan.index("00999_009999") == 9_999_999
