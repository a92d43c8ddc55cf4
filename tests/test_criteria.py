"""Criteria values and gradients against independent computations (torch.func, scipy, numpy)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal

from fgds_engine.criteria import GaussianClassStats, criterion_values, entropy, loss


def _logits(seed=0, b=5, c=7):
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_loss_is_cross_entropy_and_its_gradient():
    logits, y = _logits(), torch.tensor([0, 6, 2, 2, 5])
    logp = logits.log_softmax(-1)
    assert torch.allclose(loss(logits, y).double(), -logp[torch.arange(5), y], rtol=1e-6)
    g = torch.func.grad(lambda z: loss(z, y).sum())(logits.float())
    want = logp.exp() - F.one_hot(y, 7)  # d CE / d logits = softmax - onehot
    assert torch.allclose(g.double(), want, atol=1e-6)


def test_entropy_equals_demo_form_value_and_gradient():
    logits = _logits(1).float()
    p = logits.softmax(-1).double().numpy()
    assert np.allclose(entropy(logits).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-5)
    demo = lambda z: F.cross_entropy(z, z.softmax(-1), reduction="none").sum()  # target not detached
    assert torch.allclose(torch.func.grad(lambda z: entropy(z).sum())(logits), torch.func.grad(demo)(logits),
                          atol=1e-6)


def test_entropy_gradient_matches_finite_differences():
    z = _logits(2, b=1, c=4)[0]
    f = lambda v: float(entropy(v[None])[0])
    h = 1e-6
    fd = torch.tensor([(f(z + h * e) - f(z - h * e)) / (2 * h) for e in torch.eye(4, dtype=torch.float64)],
                      dtype=torch.float64)
    g = torch.func.grad(lambda v: entropy(v[None])[0])(z)
    assert torch.allclose(g, fd, atol=1e-6)


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(3)
    counts = [40, 12, 5, 3]
    feats = torch.cat([torch.randn(n, 6, generator=g) * (k + 1) + k for k, n in enumerate(counts)])
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return feats, labels, GaussianClassStats.fit(feats, labels, 4, prior_strength=10.0, ridge=1e-3)


def test_hardness_shrinkage_matches_numpy(fitted):
    feats, labels, stats = fitted
    z, y = feats.double().numpy(), labels.numpy()
    scatters, means = [], []
    for k in range(4):
        zk = z[y == k]
        means.append(zk.mean(0))
        scatters.append((zk - zk.mean(0)).T @ (zk - zk.mean(0)))
    pooled = sum(scatters) / (len(z) - 4)
    for k in range(4):
        n = (y == k).sum()
        sigma = (scatters[k] + 10.0 * pooled) / (n - 1 + 10.0) + 1e-3 * np.trace(pooled) / 6 * np.eye(6)
        assert np.allclose(stats.means[k].numpy(), means[k], atol=1e-5)
        assert np.allclose(stats.precisions[k].numpy(), np.linalg.inv(sigma), rtol=1e-4, atol=1e-6)


def test_hardness_is_negative_log_density_with_its_gradient(fitted):
    _, _, stats = fitted
    z = torch.randn(6, 6, generator=torch.Generator().manual_seed(9)) * 2
    y = torch.tensor([0, 1, 2, 3, 2, 0])
    got = stats.nll(z, y)
    for i in range(6):
        cov = np.linalg.inv(stats.precisions[y[i]].double().numpy())
        want = -multivariate_normal(stats.means[y[i]].double().numpy(), cov).logpdf(z[i].double().numpy())
        assert abs(got[i].item() - want) < 1e-4 * abs(want)
    g = torch.func.grad(lambda v: stats.nll(v, y).sum())(z)
    want = torch.einsum("bij,bj->bi", stats.precisions[y], z - stats.means[y])  # Sigma^-1 (z - mu)
    assert torch.allclose(g, want, atol=1e-4)


def test_stats_save_load_round_trip(fitted, tmp_path):
    _, _, stats = fitted
    stats.save(tmp_path / "stats.pt")
    back = GaussianClassStats.load(tmp_path / "stats.pt")
    for name in ("means", "precisions", "logdets", "counts"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert (back.prior_strength, back.ridge) == (10.0, 1e-3)


def test_bad_criterion_input():
    with pytest.raises(ValueError) as err:
        criterion_values("hardness", torch.zeros(1, 3), torch.tensor([0]))
    assert str(err.value) == "criterion 'hardness' needs GaussianClassStats (fit them on the real data)"
    with pytest.raises(ValueError) as err:
        criterion_values("margin", torch.zeros(1, 3), torch.tensor([0]))
    assert str(err.value) == ("unknown criterion 'margin'; choose one of loss, entropy, hardness, "
                              "feature-repulsion")
    with pytest.raises(ValueError) as err:
        GaussianClassStats.fit(torch.randn(4, 2), torch.tensor([0, 0, 2, 2]), 3)
    assert str(err.value) == "classes [1] have no samples: hardness statistics need every class"


def test_hardness_dimension_mismatch(fitted):
    with pytest.raises(ValueError) as err:
        fitted[2].nll(torch.zeros(1, 5), torch.tensor([0]))
    assert str(err.value) == "features have 5 dimensions but the statistics have 6"
