"""Option fields: a dataclass field that carries its own help, range and identity rules, and the checks
that read them. A torch-free leaf: the option dataclasses (``config``, ``plan``, ``production``, ``train``)
declare their fields with it, the command line (``options``) turns them into flags and TOML, and a production
run's identity (``production.identity``) reads which of them change the bytes."""

from __future__ import annotations

import dataclasses
import math


def option(default=dataclasses.MISSING, help: str = "", *, low=None, high=None, **meta):  # noqa: A002
    """A dataclass field that carries its own one-line help (and optional ``parse``/``metavar``) for the
    command line: ``options.add_dataclass_options`` turns it into ``--field-name``. ``low`` / ``high``: the
    inclusive range of a number (or of each number of a tuple), which ``check_fields`` enforces.
    ``neutral=``: the value that reproduces the behaviour from before the option existed (an option added to
    a released configuration must declare it); ``inert_unless="other"``: the option acts only beside that one.
    Either keeps the option out of a production run's identity when it does nothing
    (``production.run_identity``), so existing run folders resume after an upgrade."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low, "high": high, **meta})


def check_fields(obj) -> None:
    """Every number of a dataclass's fields finite (NaN and inf are refused: ``nan > 1`` is False, so a NaN
    guidance scale would silently turn guidance off) and within its ``option(low=, high=)`` range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            shown = "/".join(map(str, value)) if isinstance(value, tuple) else value
            if not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {shown}")
            low, high = f.metadata.get("low"), f.metadata.get("high")
            if low is not None and v < low:
                raise ValueError(f"{f.name} must be >= {low}, got {shown}")
            if high is not None and v > high:
                raise ValueError(f"{f.name} must be <= {high}, got {shown}")


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n, got {text!r}") from None
    return i, n
