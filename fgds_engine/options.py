"""Command-line options and TOML files mapped onto the same frozen dataclasses as the Python API.

Every field of a dataclass becomes ``--field-name``, documented with its default; a TOML file gives the same
fields in tables: [plan], [generate], [models], [sampler], [runtime] (fgds generate), [train] and
[classifier] (fgds train; [classifier] for fgds stats too); ``option_tables`` says which command takes which.
Precedence: dataclass default < TOML < flag. ``python -m fgds_engine.options`` prints docs/options.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from .config import ClassifierOptions, ModelOptions
from .deprecation import moved_names
from .errors import InputError

__getattr__ = moved_names(__name__, {"CLASSIFIER_HELP": "fgds_engine.config"})


def option_tables(command: str | None = None) -> list[tuple]:
    """(command, TOML table or None, dataclass, the command's own defaults) per option group: what each
    command's parser offers and what docs/options.md lists (``options.reference_markdown``). With
    ``command``, its rows only, and only its declarations imported (``fgds plan`` and ``fgds generate``'s
    are torch-free; ``train``, ``stats`` and ``bench`` import the engine)."""
    def plan():
        from .plan import PlanOptions

        return [("plan", "plan", PlanOptions, None),  # the classifier: only for --allocate errors
                ("plan", "classifier", ClassifierOptions, {"classifier": None})]

    def generate():
        from .config import RuntimeOptions, SamplerConfig
        from .production import GenerateOptions

        return [("generate", "generate", GenerateOptions, None), ("generate", "models", ModelOptions, None),
                ("generate", "sampler", SamplerConfig, None),
                ("generate", "runtime", RuntimeOptions, GENERATE_DEFAULTS)]

    def train():
        from .train import TrainConfig

        return [("train", "classifier", ClassifierOptions, None), ("train", "train", TrainConfig, None)]

    def select():
        from .production.select import SelectOptions

        return [("select", None, SelectOptions, None)]

    def stats():
        return [("stats", "classifier", ClassifierOptions, None)]

    def bench():
        from .bench import BenchOptions

        return [("bench", None, BenchOptions, None)]

    commands = {"plan": plan, "generate": generate, "select": select, "train": train, "stats": stats,
                "bench": bench}
    return [row for name, rows in commands.items() if command in (None, name) for row in rows()]


# fgds generate loads its pipeline itself (no caller's models to leave as found): torch's SDPA on every
# attention layer, as before the Python API's default became "keep" (so a run folder's identity is unchanged)
GENERATE_DEFAULTS = {"attention": "sdpa"}


def _base_type(tp):
    """(scalar type, is_tuple) of a field annotation such as int | None or tuple[int, int] | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_options(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One ``--field-name`` per field of ``cls``, its help from the field (``config.option``) with the default
    appended (``defaults``: a command's own, which ``build`` applies); unset flags stay absent
    (argparse.SUPPRESS) so that TOML values are not overridden."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        tp, is_tuple = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        shown = "/".join(map(str, default)) if isinstance(default, tuple) else default
        required = default is dataclasses.MISSING
        text = f.metadata.get("help", f.name).replace("%", "%%")
        kw = dict(help=text if required else f"{text} [default: {shown}]", default=argparse.SUPPRESS)
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if required:
            kw.update(required=True, default=None)
        parse = f.metadata.get("parse")
        if parse is not None:
            kw["type"] = _argparse_type(parse)
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif is_tuple and parse is None:
            group.add_argument(flag, type=tp, nargs="+", **kw)
        elif is_tuple and "metavar" not in f.metadata:
            group.add_argument(flag, nargs="+", **kw)
        elif tp is int and str in typing.get_args(hints[f.name]):  # an integer or a word such as "auto"
            group.add_argument(flag, type=_int_or_word, **kw)
        else:
            group.add_argument(flag, **({"type": tp} | kw))


def _argparse_type(parse):
    """``parse`` with its ValueError as argparse's usage error."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def positive_int(text: str) -> int:
    """An integer >= 1, for argparse (its error: one usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _int_or_word(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def read_toml(path: str | Path | None) -> dict:
    """The TOML file's tables ({} without a file)."""
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {p} is not valid TOML: {e}") from None


def build(cls, section: str, toml: dict, args: argparse.Namespace, defaults: dict | None = None):
    """``cls`` from its defaults (and a command's own ``defaults``), overridden by TOML table ``section``,
    then by the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    table = dict(toml.get(section, {}))
    unknown = sorted(set(table) - names)
    if unknown:
        raise InputError(f"unknown option(s) in [{section}] of the config file: {', '.join(unknown)}")
    values = {**(defaults or {}), **table, **{k: v for k, v in vars(args).items() if k in names}}
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if isinstance(v, list) and _base_type(hints[k])[1]:
            values[k] = tuple(v)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def reference_markdown(tables) -> str:
    """The options reference (docs/options.md): per command and TOML table, every field's flag, default and
    help, from the same ``option()`` declarations the flags come from. ``tables``: (command, TOML table or
    None, dataclass, the command's own defaults) rows, ``option_tables()``."""
    out = ["# Options reference", "",
           "Generated by `python -m fgds_engine.options > docs/options.md` from the `option()`",
           "declarations the flags and TOML tables come from (`tests/test_docs.py` fails when this file",
           "drifts). Precedence: default < TOML table (`--config FILE`) < flag.", ""]
    for command, section, cls, defaults in tables:
        where = f"`[{section}]` in `--config`" if section else "flags only"
        out += [f"## `fgds {command}`: {cls.__name__} ({where})", "", "| flag | default | what |",
                "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = (defaults or {}).get(f.name, f.default)
            shown = "/".join(map(str, default)) if isinstance(default, tuple) else str(default)
            shown = "(required)" if default is dataclasses.MISSING else shown
            text = f.metadata.get("help", "").replace("|", "\\|")
            out.append(f"| `--{f.name.replace('_', '-')}` | `{shown}` | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(option_tables()), end="")
