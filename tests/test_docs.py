"""The docs against the code: the README's quickstart blocks run as written, the options reference is the
one the code generates, and the README's layout lists the package's modules and nothing else."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


QUICKSTARTS = _blocks(_section(README, "Quickstarts"))


def test_the_readme_is_a_front_door():
    assert README.count("\n") <= 250
    assert [lang for lang, _ in QUICKSTARTS] == ["bash", "bash", "python"]
    for link in re.findall(r"\]\((docs/[\w.-]+)\)", README):
        assert (ROOT / link).is_file(), link


def _run_lines(block: str, cwd: Path, capsys, monkeypatch) -> list[str]:
    """Each command line of a bash block through the ``fgds`` entry point (``cli.main``, in this process),
    in ``cwd``; what each printed."""
    from fgds_engine.cli import main

    monkeypatch.chdir(cwd)
    outs = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "fgds", line
        capsys.readouterr()
        assert main(argv[1:]) == 0, line
        outs.append(capsys.readouterr().out)
    return outs


def test_quickstart_demo(quick_demo, capsys, monkeypatch):
    """Run in the session's quick-demo folder (the cold run is ``quick_demo``'s, checked in test_train): as
    written, warm: every model and sample comes from the cache, and the numbers are the cold run's."""
    import json

    folder, _, cold = quick_demo
    assert "--out demo_quick" in QUICKSTARTS[0][1] and folder.name == "demo_quick"
    (out,) = _run_lines(QUICKSTARTS[0][1], folder.parent, capsys, monkeypatch)
    assert "trained in" not in out and out.count("0 generated now") == 4
    assert json.loads((folder / "metrics.json").read_text())["accuracy"] == cold["accuracy"]


def test_quickstart_produce_a_dataset(tmp_path, capsys, monkeypatch):
    from test_plan import make_lt_folder

    make_lt_folder(tmp_path / "data" / "train", counts={"ant": 3, "bee": 2})  # 1 + 1 (min per class) jobs
    plan, generate, status = _run_lines(QUICKSTARTS[1][1], tmp_path, capsys, monkeypatch)
    assert status.splitlines()[-1].split() == ["total", "2", "2", "0", "0"]
    assert len(list((tmp_path / "synth").glob("*/*.png"))) == 2


def test_quickstart_drop_into_diffusers(tmp_path, monkeypatch):
    """As written, with a tiny pipeline saved in place of the hub id and timm's test ResNet in place of the
    pretrained one (nothing is downloaded in tests)."""
    from fgds_engine.models import tiny_pipeline

    tiny_pipeline("sd").save_pretrained(tmp_path / "sd")
    code = QUICKSTARTS[2][1]
    for old, new in ((HUB_ID, str(tmp_path / "sd")),
                     ('load_timm_classifier("resnet50", num_classes=1000, pretrained=True)',
                      'load_timm_classifier("test_resnet", num_classes=1000, pretrained=False)')):
        assert old in code
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md quickstart 3", "exec"), scope)
    from PIL import Image

    assert Image.open(tmp_path / "tench.png").size == (16, 16)
    assert scope["out"].criterion.shape == (2,) and not scope["out"].nan.any()


def test_options_reference_is_generated_from_the_code():
    from fgds_engine.options import option_tables, reference_markdown

    want = reference_markdown(option_tables())
    assert (ROOT / "docs" / "options.md").read_text(encoding="utf-8") == want, \
        "docs/options.md drifted: python -m fgds_engine.options > docs/options.md"
    for field in ("cfg_interval", "cads_noise", "repulsion_scale", "attention"):
        assert f"`--{field.replace('_', '-')}`" in want


def test_the_readme_layout_lists_the_package():
    block = _blocks(_section(README, "Layout, in the order of one sample's path"))[0][1]
    pkg = ROOT / "fgds_engine"
    listed = set()
    for line in block.splitlines():
        m = re.match(r"^  (\S+)", line)
        if m and not m.group(1).startswith("#"):
            listed.add(m.group(1))
    shipped = {p.name for p in pkg.glob("*.py") if p.name != "__init__.py"}
    shipped |= {p.name + "/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert listed == shipped
    # the files a subpackage's line names exist
    for sub in (p for p in shipped if p.endswith("/")):
        line = block[block.index("  " + sub):].split("\n  ", 1)[0]
        for name in re.findall(r"\b(\w+\.py)\b", line):
            assert (pkg / sub / name).is_file(), f"{sub}{name}"


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_python_blocks_compile(doc):
    """Every Python block of the long-form docs is valid Python (the quickstarts run in full above)."""
    for lang, code in _blocks((ROOT / "docs" / doc).read_text(encoding="utf-8")):
        if lang == "python":
            compile(code, doc, "exec")


def test_make_install_stops_early_on_a_full_disk(tmp_path):
    """`make install` into a venv without torch, asked for more free space than any disk has, stops before
    pip with the size it needs and what is free (a venv that has torch skips the check: nothing big to
    install)."""
    import shutil
    import subprocess
    import sys

    from conftest import SAFETY_NET

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "v"
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "install", f"VENV={venv}", "NEED_GB=1000000",
                          f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=SAFETY_NET)
    assert run.returncode == 2, run.stdout + run.stderr
    msg = re.search(r"^make: installing into (\S+) needs about 1000000 GiB free "
                    r"\(torch with its CUDA libraries, triton, diffusers: 6\.0 GiB\); "
                    r"(\d+\.\d) GiB free there$",
                    run.stderr, flags=re.M)
    assert msg and msg[1] == str(venv), run.stderr
    assert abs(float(msg[2]) - shutil.disk_usage(venv).free / 2**30) < 1.0
    assert not (venv / ".fgds-installed").exists()
    assert not list(venv.glob("lib/python*/site-packages/torch"))
