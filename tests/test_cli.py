"""The `fgds` command's help (the commands themselves: test_production.py, test_train.py)."""

import argparse
import re

import pytest

from fgds_engine.cli import build_parser


def test_demo_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--setting {long-tail,groups} which demo (default: long-tail)",
                   "--prior {matched,milder}", "(default: matched)",
                   "--out OUT output folder, trained models cached in OUT/cache (default: demo_out, "
                   "demo_out/groups for --setting groups) --seed", "--seed SEED", "(default: 0)", "--quick",
                   "each digit's color 90% one color", "matched (90% majority"):
        assert option in text
    assert "%%" not in text


COMMANDS = ["demo", "plan", "generate", "status", "train", "stats", "bench"]


def test_top_level_help_lists_exactly_the_commands(capsys):
    """The parser's subcommands are exactly these, each in the help's list and with a --help of its own."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == COMMANDS
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    listed = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1).split(",")
    assert listed == COMMANDS
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: fgds {command}")


def test_module_docstring_names_every_command():
    import fgds_engine.cli

    first = fgds_engine.cli.__doc__.splitlines()[0]
    assert first == "The ``fgds`` command: " + ", ".join(COMMANDS) + "."
