"""The training layer (Balanced Softmax, 50/50 batches, shot groups, resumable training) and the demo."""

import json
import math

import pytest
import torch
from torch import nn

from fgds_engine.train import (
    MixedBatchSampler,
    TrainConfig,
    balanced_softmax_loss,
    batch_log_prior,
    evaluate,
    shot_groups,
    train_classifier,
)


def test_balanced_softmax_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 3, 1])
    counts = torch.tensor([50.0, 10.0, 3.0, 1.0])
    direct = []
    for z, y in zip(logits.double(), labels):
        w = counts.double() * z.exp()  # p(y | x) = n_y e^{z_y} / sum_j n_j e^{z_j}
        direct.append(-(w[y] / w.sum()).log())
    got = balanced_softmax_loss(logits, labels, counts.log())
    assert abs(got.item() - torch.stack(direct).mean().item()) < 1e-6


def test_batch_prior_of_mixed_batches():
    counts = [60, 30, 10]
    plain = batch_log_prior(counts, mixed=False).exp()
    mixed = batch_log_prior(counts, mixed=True).exp()
    assert torch.allclose(plain, torch.tensor([0.6, 0.3, 0.1]))
    assert torch.allclose(mixed, 0.5 * torch.tensor([0.6, 0.3, 0.1]) + 0.5 / 3)


def test_mixed_batches_are_exactly_half_synthetic_and_class_balanced():
    real = [0] * 37 + [1] * 9 + [2] * 3  # 49 real
    synth = [0] * 2 + [1] * 20 + [2] * 31 + [3] * 7  # 60 synthetic, one class without real data
    sampler = MixedBatchSampler(real, synth, 16, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(49 / 8)
    seen_real = set()
    synth_classes = []
    for b in batches:
        assert len(b) == 16 and sum(i < 49 for i in b) == 8  # exactly 8 real, 8 synthetic
        seen_real |= {i for i in b if i < 49}
        synth_classes += [synth[i - 49] for i in b if i >= 49]
    assert seen_real == set(range(49))  # every real image once per epoch at least
    per_class = torch.bincount(torch.tensor(synth_classes), minlength=4)
    assert per_class.max() - per_class.min() <= 1, per_class  # balanced to within one over the epoch
    assert list(MixedBatchSampler(real, synth, 16, seed=5)) == batches  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="batch_size must be even"):
        MixedBatchSampler(real, synth, 7)


def test_shot_groups_and_evaluation_on_a_hand_made_case():
    counts = [150, 101, 100, 20, 19, 2]  # many: > 100; medium: 20..100; few: < 20
    assert shot_groups(counts) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5, 5])
    preds = torch.tensor([0, 1, 1, 2, 0, 3, 4, 5, 0, 0])
    m = evaluate(preds, labels, counts, groups=torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]))
    assert m["overall"] == pytest.approx(6 / 10)
    assert m["many"] == pytest.approx(2 / 3) and m["medium"] == pytest.approx(2 / 3)
    assert m["few"] == pytest.approx(2 / 4)
    assert m["per_class"][5] == pytest.approx(1 / 3)
    assert m["per_group"] == pytest.approx({0: 3 / 5, 1: 3 / 5})
    assert m["worst_group"] == pytest.approx(3 / 5) and m["worst_group_id"] == 0  # a tie: the smaller id
    other = evaluate(preds, labels, counts, groups=torch.tensor([3, 3, 3, 3, 2, 2, 2, 2, 2, 2]))
    assert other["per_group"] == pytest.approx({2: 1 / 2, 3: 3 / 4}) and other["worst_group_id"] == 2
    assert evaluate(preds, labels, [150] * 6)["few"] is None
    bare = evaluate(preds, labels, None)  # no training counts: no shot groups, the classes present
    assert "many" not in bare and bare["per_class"] == m["per_class"] and bare["overall"] == m["overall"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float()
    return torch.utils.data.TensorDataset(x, y), y.tolist()


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_training_resumes_from_a_checkpoint_to_the_same_weights(tmp_path, schedule):
    real, ry = _data(40, 1)
    synth, sy = _data(30, 2)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.1, schedule=schedule)
    whole = _model()
    h1 = train_classifier(whole, real, ry, synth, sy, config=cfg, num_classes=3)
    part = _model()
    train_classifier(part, real, ry, synth, sy, config=cfg, num_classes=3, checkpoint=tmp_path / "ck.pt",
                     stop_after_epoch=2)
    resumed = _model()
    h2 = train_classifier(resumed, real, ry, synth, sy, config=cfg, num_classes=3,
                          checkpoint=tmp_path / "ck.pt")
    assert [r["epoch"] for r in h2] == [1, 2, 3, 4] and h2 == h1
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert h1[-1]["loss"] < h1[0]["loss"]


def test_demo_quick_runs_end_to_end_and_caches(quick_demo, tmp_path, capsys):
    from fgds_engine.cli import main

    folder, out, metrics = quick_demo  # its cold run
    for row in ("real only", "no feedback", "loss", "entropy", "hardness"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert set(metrics["accuracy"]) == {"real only", "no feedback", "loss", "entropy", "hardness"}
    assert all(0 <= metrics["accuracy"][v]["overall"] <= 1 for v in metrics["accuracy"])
    counts = metrics["train_counts"]
    assert max(counts) == 120 and min(counts) == 2 and len(counts) == 10
    for name in ("accuracy.png", "samples-no-feedback.png", "samples-hardness.png"):
        assert (folder / name).stat().st_size > 0
    # the warm rerun (everything cached) is the README's quickstart: tests/test_docs.py
    # cold again, in another folder, with the caller's torch at 1 thread: the demo fixes its own thread
    # count, so every number is the same
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path / "cold"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    cold = json.loads((tmp_path / "cold" / "metrics.json").read_text())
    timing = ("seconds_per_image", "time_vs_no_feedback")  # measured per run: the one thing that may differ
    untimed = lambda m: {v: {k: x for k, x in s.items() if k not in timing} for v, s in m["samples"].items()}  # noqa: E731
    assert cold["accuracy"] == metrics["accuracy"] and untimed(cold) == untimed(metrics)
    assert all(s["seconds_per_image"] > 0 for s in metrics["samples"].values())


def test_fgds_train_and_stats_on_image_folders(tmp_path, capsys):
    from test_plan import make_lt_folder

    from fgds_engine.class_stats import LowRankClassStats, load_class_stats
    from fgds_engine.cli import main

    real = make_lt_folder(tmp_path / "real", {"ant": 9, "bee": 5, "cat": 2})
    synth = make_lt_folder(tmp_path / "synth", {"bee": 4, "cat": 7}, seed=1)  # no folder for the head class
    test = make_lt_folder(tmp_path / "test", {"ant": 3, "bee": 3, "cat": 3}, seed=2)
    names = [f"{c}/{k}.{'png' if k % 2 == 0 else 'jpg'}" for c in ("ant", "bee", "cat") for k in range(3)]
    (tmp_path / "groups.json").write_text(json.dumps({n: int(n.split("/")[1][0] == "0") for n in names}))
    clf = ["--classifier", "timm:test_vit", "--classifier-kwargs",
           '{"img_size": 16, "patch_size": 4, "dynamic_img_size": false}', "--image-size", "16", "--quiet"]
    assert main(["train", "--real", str(real), "--synthetic", str(synth), "--test", str(test), "--out",
                 str(tmp_path / "run"), "--epochs", "2", "--batch-size", "4", "--test-groups",
                 str(tmp_path / "groups.json"), *clf]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["synthetic"] == 11 and metrics["classes"] == ["ant", "bee", "cat"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["test"]["many"] is None and metrics["test"]["few"] is not None
    assert "worst_group" in metrics["test"] and "worst-group accuracy" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["stats", str(real), "--out", str(tmp_path / "stats.pt"), "--rank-cap", "4", *clf]) == 0
    assert "class(es) past the rank cap 4" in capsys.readouterr().out
    stats = load_class_stats(tmp_path / "stats.pt")  # the streamed low-rank format
    assert isinstance(stats, LowRankClassStats) and stats.capped == 1  # "ant": 9 samples, rank 8 > 4
    assert stats.num_classes == 3 and stats.counts.tolist() == [9, 5, 2]
