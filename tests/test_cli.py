"""The `fgds` command: the random-weights demo and its help."""

import pytest
from PIL import Image

from fgds_engine.cli import build_parser, main


def test_demo_writes_grid_and_feedback_raises_entropy(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--per-row", "3", "--steps", "6", "--quiet"]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (1 + 3 * 17, 1 + 2 * 17)  # 3 columns, 2 rows of 16x16 images, 1-pixel padding
    out = capsys.readouterr().out
    assert out.count("RANDOM weights") == 2
    means = [float(line.split(":")[1].split()[0]) for line in out.splitlines() if "mean entropy" in line]
    assert len(means) == 2 and means[1] > means[0], "entropy feedback must raise the final entropy"


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--out OUT", "(default: demo_out)", "--steps STEPS", "(default: 20)", "{loss,entropy}"):
        assert option in text
