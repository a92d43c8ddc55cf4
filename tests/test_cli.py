"""The `fgds` command's help (the commands themselves: test_production.py, test_train.py)."""

import pytest

from fgds_engine.cli import build_parser


def test_demo_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--out OUT", "(default: demo_out)", "--seed SEED", "(default: 0)", "--quick"):
        assert option in text


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "plan", "generate", "status", "train", "stats"):
        assert command in text
