"""Allocation by the classifier's errors: `fgds plan --allocate errors --val VAL --classifier ...` splits the
uniform plan's total budget (split_budget, checked by hand), records the errors, shows them in `fgds
status`; its one-line errors."""

import json

import pytest
from test_plan import make_lt_folder
from test_production import tiny_vit_checkpoint

from fgds_engine.cli import main
from fgds_engine.errors import InputError
from fgds_engine.plan import read_plan, split_budget

COUNTS = {"ant": 9, "bee": 5, "cat": 2, "dog": 1}  # the uniform plan: 1 + 4 + 7 + 8 = 20 images
VAL = {"ant": 4, "bee": 4, "cat": 4, "dog": 4}


def test_the_budget_split_by_hand():
    errors = {"a": 0.0, "b": 0.25, "c": 0.75}
    # floor 2 each; the other 14 in proportion to the errors: 0, 3.5, 10.5 -> 0, 3, 10 and the one left to the
    # largest remainder (b and c tie at 0.5: class order gives it to b)
    assert split_budget(20, errors, 2, 1.0) == {"a": 2, "b": 6, "c": 12}
    # power 2: weights 0, 1/16, 9/16 -> 1.4, 12.6 of 14 -> 1, 12, the one left to c (0.6 > 0.4)
    assert split_budget(20, errors, 2, 2.0) == {"a": 2, "b": 3, "c": 15}
    # power 0, or every error 0: evenly, 14 / 3 = 4.67 -> 4 each and the two left to a and b
    assert split_budget(20, errors, 2, 0.0) == {"a": 7, "b": 7, "c": 6}
    assert split_budget(20, dict.fromkeys("abc", 0.0), 2, 1.0) == {"a": 7, "b": 7, "c": 6}
    assert split_budget(6, errors, 2, 1.0) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(InputError, match=r"^--allocate-floor 3 x 3 classes is more than the budget, 8 "):
        split_budget(8, errors, 3, 1.0)


@pytest.fixture
def folders(tmp_path):
    data = make_lt_folder(tmp_path / "data", COUNTS)
    val = make_lt_folder(tmp_path / "val", VAL, seed=3)
    clf = tiny_vit_checkpoint(tmp_path / "clf.pt", len(COUNTS)) + ["--image-size", "16", "--quiet"]
    return data, val, clf


def test_plan_allocate_errors_end_to_end(tmp_path, folders, capsys):
    data, val, clf = folders
    out = tmp_path / "out"
    assert main(["plan", str(data), str(out), "--allocate", "errors", "--val", str(val), "--allocate-floor",
                 "2", *clf]) == 0
    plan = read_plan(out)
    errors = plan.errors
    assert set(errors) == set(COUNTS) and all(e * 4 == round(e * 4) for e in errors.values())  # of 4 each
    assert plan.deficit == split_budget(20, errors, 2, 1.0) and sum(plan.deficit.values()) == 20
    assert json.loads((out / "plan.json").read_text())["errors"] == errors
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["class", "index", "error", "real", "synthetic", "total"]
    assert main(["status", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["class", "error", "planned", "done", "failed", "pending"]
    assert [float(r.split()[1]) for r in rows[1:5]] == pytest.approx([round(errors[c], 3) for c in COUNTS])
    over = tmp_path / "over"  # with --oversample: the allocated budget is what a selection keeps
    assert main(["plan", str(data), str(over), "--allocate", "errors", "--val", str(val), "--allocate-floor",
                 "2", "--oversample", "2", *clf]) == 0
    oplan = read_plan(over)
    assert oplan.keep == plan.deficit and oplan.deficit == {c: 2 * n for c, n in plan.deficit.items()}


@pytest.mark.parametrize("case", ["no classifier", "no val", "other classes", "val without allocate",
                                  "classifier without allocate", "unknown allocate"])
def test_allocation_errors_are_one_line(tmp_path, folders, capsys, case):
    data, val, clf = folders
    out = tmp_path / "out"
    argv = ["plan", str(data), str(out), "--allocate", "errors", "--val", str(val), *clf]
    message = {
        "no classifier": "--allocate errors needs --classifier: the budget follows its errors on --val",
        "no val": "--allocate errors needs --val VAL: a validation ImageFolder of the same classes (never "
                  "the test set), where the classifier's errors are measured",
        "other classes": f"--val {tmp_path / 'val3'} has the classes ['ant', 'bee', 'cat'], DATA ['ant', "
                         "'bee', 'cat', 'dog']: a validation split of the same classes",
        "val without allocate": "--val, --allocate-floor and --allocate-power are for --allocate errors",
        "classifier without allocate": "--classifier, --classifier-checkpoint, --classifier-kwargs, "
                                       "--image-size: for --allocate errors (the classifier it measures)",
        "unknown allocate": "allocate must be 'errors' (or not given), got 'loss'",
    }[case]
    if case == "no classifier":
        argv = argv[:7]
    elif case == "no val":
        argv = argv[:5] + argv[7:]
    elif case == "other classes":
        make_lt_folder(tmp_path / "val3", {"ant": 2, "bee": 2, "cat": 2})
        argv[6] = str(tmp_path / "val3")
    elif case == "val without allocate":
        argv = argv[:3] + argv[5:7]
    elif case == "classifier without allocate":
        argv = argv[:3] + clf[:-1]
    else:
        argv[4] = "loss"
    assert main(argv) == 2
    assert capsys.readouterr().err == f"fgds: error: {message}\n"
    assert not (out / "plan.json").exists()
