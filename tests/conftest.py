"""Shared fixtures: tiny random models built in code (no weights, no network)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fgds_engine.conditioning import Conditioning
from fgds_engine.criteria import GaussianClassStats
from fgds_engine.models import Classifier, tiny_models

NUM_CLASSES = 10
# Seconds: the bound on every wait in the tests (a subprocess, a poll, an event). A safety net for a hung
# run, never a verdict on the machine's speed: generous for a shared 2-core machine 3x slower than any seen.
SAFETY_NET = 3600


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (make test-slow)")


def pytest_collection_modifyitems(config, items):
    """The tests marked slow (a path the default suite covers at a small size, here at its real size) skip
    unless --slow is given."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: the real size of a path tested small; make test-slow runs it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A script of the repository (an experiment, the GPU run's driver) as a module, by its path: no
    ``sys.path`` edit, and the script imports only the package."""
    name = "script_" + relpath.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_cond(batch: int, *, seed: int = 1, text_dim: int = 16, image_embed_dim: int | None = None):
    g = torch.Generator().manual_seed(seed)
    pe, npe = torch.randn(batch, 5, text_dim, generator=g), torch.randn(batch, 5, text_dim, generator=g)
    cl = None if image_embed_dim is None else torch.randn(batch, image_embed_dim, generator=g)
    return Conditioning(pe, npe, cl)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The long-tail quick demo, run cold once per session in <tmp>/demo_quick: (folder, what it printed,
    its metrics.json). test_train checks it; the README's quickstart reruns it there, cached."""
    import contextlib
    import io
    import json

    from fgds_engine.cli import main

    folder = tmp_path_factory.mktemp("quickstart") / "demo_quick"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(folder), "--quiet"]) == 0
    return folder, printed.getvalue(), json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="session")
def tiny():
    return tiny_models(num_classes=NUM_CLASSES, seed=0)


@pytest.fixture(scope="session")
def tiny_unclip():
    return tiny_models(num_classes=NUM_CLASSES, seed=0, image_embed_dim=12)


@pytest.fixture(scope="session")
def tiny_pixel():
    return tiny_models(num_classes=NUM_CLASSES, seed=0, pixel_space=True)


@pytest.fixture(scope="session")
def tiny_stats(tiny):
    """Hardness statistics fitted on the tiny classifier's features of random 'real' images."""
    g = torch.Generator().manual_seed(5)
    images = torch.rand(80, 3, 16, 16, generator=g)
    labels = torch.arange(80) % NUM_CLASSES
    with torch.no_grad():
        _, feats = Classifier(tiny.classifier)(images, with_features=True)
    return GaussianClassStats.fit(feats, labels, NUM_CLASSES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = ""):
    """allclose that fails on NaN/inf in either tensor and reports the first differing index (Liger-style)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    assert not bad_a.any(), f"{name}: {int(bad_a.sum())} non-finite, first at {bad_a.nonzero()[0].tolist()}"
    assert not bad_e.any(), f"{name}: non-finite expected values at {bad_e.nonzero()[0].tolist()}"
    diff = (a - e).abs() > atol + rtol * e.abs()
    if diff.any():
        i = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(diff.sum())}/{diff.numel()} elements differ beyond atol={atol} "
                             f"rtol={rtol}; first at {list(i)}: {a[i].item()!r} vs {e[i].item()!r}; "
                             f"max abs diff {(a - e).abs().max().item():.3g}")


@pytest.fixture(scope="session")
def groups_quick(tmp_path_factory):
    """One cold quick run of the groups demo, laid out as the quality bench's seed 0 / matched prior folder
    (the benches reuse its cache; test_demo checks it): (folder, what it printed)."""
    import contextlib
    import io

    from fgds_engine.cli import main

    folder = tmp_path_factory.mktemp("groups") / "seed0" / "matched"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--setting", "groups", "--quick", "--out", str(folder), "--quiet"]) == 0
    return folder, printed.getvalue()
