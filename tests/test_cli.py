"""The `fgds` command: its help, and its one-line errors for bad numbers and overlapping folders (the commands
themselves: test_production.py, test_train.py)."""

import argparse
import re

import pytest

from fgds_engine.cli import build_parser
from fgds_engine.config import SamplerConfig
from fgds_engine.errors import InputError


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


COMMANDS = ["demo", "plan", "generate", "status", "select", "train", "stats", "bench"]


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


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


BAD_GENERATE = [
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number, got nan"),  # nan > 1: no CFG
    (["--feedback-scale", "inf"], "feedback_scale must be a finite number, got inf"),
    (["--classifier-size", "-5"], "classifier_size must be >= 1, got -5"),
    (["--embedding-dropout", "1.5"], "embedding_dropout must be <= 1.0, got 1.5"),
    (["--classifier-std", "0.2", "0", "0.2"], "classifier_std must be > 0, got 0.2/0.0/0.2"),
    (["--feedback-window", "5", "2"], "feedback_window must be start < stop, got (5, 2)"),
    (["--feedback-chunk", "0"], "feedback_chunk must be >= 1, got 0"),
    (["--threads", "0"], "threads must be >= 1, got 0"),
    (["--noise-level", "-1"], "noise_level must be >= 0, got -1"),
]


@pytest.mark.parametrize("flags,message", BAD_GENERATE)
def test_generate_refuses_numbers_out_of_range_in_one_line(tmp_path, capsys, flags, message):
    """Found by trying: --guidance-scale nan was accepted (and turned guidance off), --classifier-size -5
    ended in a traceback with exit 1. Every numeric option is declared with its range and checked finite."""
    from test_production import planned

    from fgds_engine.cli import main

    out = planned(tmp_path)
    before = _snapshot(out)
    assert main(["generate", str(out), "--preset", "tiny-random", *flags]) == 2
    assert capsys.readouterr().err == f"fgds: error: {message}\n"
    assert _snapshot(out) == before  # nothing written


def test_a_toml_nan_is_refused_like_a_flag(tmp_path, capsys):
    from test_production import planned

    from fgds_engine.cli import main

    out = planned(tmp_path)
    (tmp_path / "run.toml").write_text("[sampler]\neta = nan\n")
    toml = ["--config", str(tmp_path / "run.toml")]
    assert main(["generate", str(out), "--preset", "tiny-random", *toml]) == 2
    assert capsys.readouterr().err == "fgds: error: eta must be a finite number, got nan\n"


def test_overlapping_folders_are_refused_before_anything_is_written(tmp_path, capsys):
    """Found by trying: `fgds plan DATA DATA/synthetic` was accepted and left a folder that the next scan of
    DATA reads as a class without images."""
    from test_production import make_lt_folder

    from fgds_engine.cli import main

    data = tmp_path / "data"
    make_lt_folder(data, {"ant": 3, "bee": 1})
    before = _snapshot(tmp_path)
    clf = ["--classifier", "timm:test_resnet"]
    cases = [
        (["plan", str(data), str(data / "synthetic")],
         f"OUT ({data / 'synthetic'}) is inside DATA ({data}): keep them apart"),
        (["plan", str(data), str(data)], f"DATA and OUT are the same folder ({data}): keep them apart"),
        (["plan", str(data / "ant"), str(data)],
         f"DATA ({data / 'ant'}) is inside OUT ({data}): keep them apart"),
        (["train", "--real", str(data), "--test", str(data), "--out", str(tmp_path / "r"), *clf],
         f"--real and --test are the same folder ({data}): keep them apart"),
        (["train", "--real", str(data), "--test", str(tmp_path / "t"), "--out", str(data / "run"), *clf],
         f"--out ({data / 'run'}) is inside --real ({data}): keep them apart"),
        (["train", "--real", str(data), "--synthetic", str(tmp_path / "s"), "--test",
          str(tmp_path / "s" / "t"), "--out", str(tmp_path / "r"), *clf],
         f"--test ({tmp_path / 's' / 't'}) is inside --synthetic ({tmp_path / 's'}): keep them apart"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"fgds: error: {message}\n"
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [["status", "OUT", "--per-class", "0"], ["stats", "DATA", "--out", "x",
                                                                           "--classifier", "timm:a",
                                                                           "--rank-cap", "-1"]])
def test_plain_integer_flags_are_positive(capsys, argv):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    flag, value = argv[-2], argv[-1]
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument {flag}: must be an integer >= 1, got '{value}'")


def test_generate_asks_for_sdpa_attention_and_the_python_api_keeps_the_callers(capsys, tmp_path):
    """``fgds generate`` loads its own pipeline: SDPA on every attention layer, as before (the run folder's
    identity is unchanged), said in its --help; the Python API's default leaves a caller's processors."""
    from fgds_engine.cli import sampler_options
    from fgds_engine.config import RuntimeOptions

    assert RuntimeOptions().attention == "keep"
    args = build_parser().parse_args(["generate", str(tmp_path)])
    assert sampler_options({}, args)[1].attention == "sdpa"
    assert sampler_options({"runtime": {"attention": "keep"}}, args)[1].attention == "keep"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "replace every processor of the models in place [default: sdpa]" in text


# SamplerConfig's fields before the split into SamplerConfig + RuntimeOptions: a run folder's identity
PREVIOUS_SAMPLER_FIELDS = {
    "num_inference_steps", "scheduler", "guidance_scale", "feedback_scale", "criterion", "feedback_every",
    "feedback_window", "feedback_mode", "grad_path", "eta", "embedding_dropout", "image_size",
    "classifier_size", "classifier_mean", "classifier_std", "dtype", "channels_last", "backend", "attention",
    "cuda_graphs", "grad_scale", "feedback_chunk", "cfg_interval", "cads", "cads_noise", "cads_rescale",
    "repulsion_scale"}
# added since, each declared neutral or inert (out of the identity at that value: an old folder resumes)
ADDED_SAMPLER_FIELDS = {"true_cfg_scale", "skip_layer_guidance", "skip_layer_guidance_scale",
                        "skip_layer_guidance_start", "skip_layer_guidance_stop"}


def test_a_sampler_table_of_the_previous_release_is_read_and_the_run_identity_keeps_its_keys(tmp_path):
    import dataclasses

    from fgds_engine.cli import sampler_options
    from fgds_engine.config import RuntimeOptions
    from fgds_engine.production import identity_rules

    names = {f.name for c in (SamplerConfig, RuntimeOptions) for f in dataclasses.fields(c)}
    assert names == PREVIOUS_SAMPLER_FIELDS | ADDED_SAMPLER_FIELDS  # the one table run.json hashes
    assert ADDED_SAMPLER_FIELDS <= set(identity_rules()["sampler"])
    args = build_parser().parse_args(["generate", str(tmp_path), "--backend", "torch"])
    old = {"sampler": {"criterion": "loss", "dtype": "float16", "feedback_chunk": 4, "attention": "default"}}
    cfg, rt = sampler_options(old, args)
    assert (cfg.criterion, rt.dtype, rt.feedback_chunk, rt.attention, rt.backend) == (
        "loss", "float16", 4, "default", "torch")
    both = (r"^dtype given in \[sampler\] and in \[runtime\] of the config file: "
            r"it belongs in \[runtime\] only$")
    with pytest.raises(InputError, match=both):
        sampler_options({"sampler": {"dtype": "float16"}, "runtime": {"dtype": "float32"}}, args)
    unknown = r"^unknown option\(s\) in \[runtime\] of the config file: criterion$"
    with pytest.raises(InputError, match=unknown):
        sampler_options({"runtime": {"criterion": "loss"}}, args)
