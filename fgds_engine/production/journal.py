"""The journal of a worker's run: its JSONL manifest part, its unit records, and what they say is done.

Each worker appends one JSONL manifest record per finished sample to its own part (the dataset's index),
flushed and fsynced per batch (WebDataset: per tar, after the tar's rename), and then, per finished unit, one
32-byte *unit record* (unit, the byte range of its records in the part, how many of its jobs are still
missing, a check) to its own ``units-*.bin``, fsynced. So what is done is known from the unit records (a few
bytes per unit, whatever the plan's size), plus the records after a part's last unit record (a kill between
the two appends) and those of units with failures, which ``Progress.load`` parses.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from ..plan import Plan
from ..writers import Writer


def _parse_records(data: bytes) -> list[dict]:
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut by a kill; repaired when its writer reopens the part
    return records


def cut_partial(path: Path, record: int) -> int:
    """Cut a partial last record (a kill mid-write: a line without its newline, or a fraction of a fixed
    ``record`` size); returns the size after."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if record > 1:
        keep = size - size % record
    else:
        keep = path.read_bytes().rfind(b"\n") + 1  # 0 for an empty part
    if keep != size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return keep


class ManifestPart:
    """One worker's JSONL manifest part: a partial last line (a kill mid-write) is cut on open; ``size`` is
    the byte offset after the last record (the unit records point into the part)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.size = cut_partial(path, 1)
            self.f = open(path, "ab")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        _append(self.f, data, self.path)
        self.size += len(data)

    def close(self) -> None:
        self.f.close()


def _append(f, data: bytes, path: Path) -> None:
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------- unit records

UNIT_RECORD = np.dtype([("unit", "<i8"), ("start", "<i8"), ("end", "<i8"), ("missing", "<i4"),
                        ("check", "<u4")])
_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def unit_check(unit, start, end, missing, key: int):
    """32 bits that tie a unit record to its fields and its run (numpy arrays or ints)."""
    if isinstance(unit, np.ndarray):
        u64 = [np.asarray(v).astype(np.uint64) for v in (unit, start, end, missing)]
        mixed = [(v * np.uint64(m)) & np.uint64(0xFFFFFFFF) for v, m in zip(u64, _MIX)]
        return (mixed[0] ^ mixed[1] ^ mixed[2] ^ mixed[3] ^ np.uint64(key)).astype(np.uint32)
    mixed = [(v * m) & 0xFFFFFFFF for v, m in zip((unit, start, end, missing), _MIX)]
    return mixed[0] ^ mixed[1] ^ mixed[2] ^ mixed[3] ^ key


def run_key(run_hash: str) -> int:
    """The 32-bit key of a run's unit records (from the hash its records carry)."""
    return int(hashlib.sha256(run_hash.encode()).hexdigest()[:8], 16)


class UnitLog:
    """One worker's unit records (``units-*.bin``): appended and fsynced after the unit's manifest records."""

    def __init__(self, path: Path, run_hash: str):
        self.path, self.key = path, run_key(run_hash)
        try:
            cut_partial(path, UNIT_RECORD.itemsize)
            self.f = open(path, "ab")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def append(self, rows: list[tuple[int, int, int, int]]) -> None:
        """(unit, start, end, missing) per finished unit."""
        if rows:
            recs = np.array([(*r, unit_check(*r, self.key)) for r in rows], dtype=UNIT_RECORD)
            _append(self.f, recs.tobytes(), self.path)

    def close(self) -> None:
        self.f.close()


def read_units(path: Path, run_hash: str, n_units: int, part_size: int) -> np.ndarray:
    """The unit records of ``path`` (a partial last record ignored); InputError for one that is damaged, of
    another run, or points past its manifest part."""
    if not path.exists():
        return np.zeros(0, UNIT_RECORD)
    data = path.read_bytes()
    recs = np.frombuffer(data[:len(data) - len(data) % UNIT_RECORD.itemsize], dtype=UNIT_RECORD)
    if len(recs):
        good = recs["check"] == unit_check(recs["unit"], recs["start"], recs["end"], recs["missing"],
                                       run_key(run_hash))
        good &= ((recs["unit"] >= 0) & (recs["unit"] < n_units) & (recs["start"] >= 0)
                 & (recs["start"] <= recs["end"]) & (recs["end"] <= part_size) & (recs["missing"] >= 0))
        if not good.all():
            i = int(np.flatnonzero(~good)[0])
            part = path.name.replace("units-", "manifest-").replace(".bin", ".jsonl")
            raise InputError(f"{path} record {i} (unit {int(recs['unit'][i])}) is damaged, of another run, "
                             f"or points past {part} "
                             "(edited, or copied from another folder?); nothing was changed: move the file "
                             "away and resume, which rebuilds it from the manifest part (slower, once)")
    return recs


@dataclass
class Progress:
    """What is done, from the unit records and the manifest records they do not cover.

    complete[u]: every job of unit u succeeded; done / failed: job indices, outside complete units, that
    succeeded / failed (NaN after every retry) in some record; tails: per manifest part, (start, end, units
    touched) of its records after its last unit record.
    """

    unit_size: int
    n_jobs: int
    complete: np.ndarray
    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    tails: dict[str, tuple[int, int, set[int]]] = field(default_factory=dict)
    last_units: dict[str, int] = field(default_factory=dict)  # per part: its last complete unit

    def jobs_of(self, u: int) -> range:
        return range(u * self.unit_size, min((u + 1) * self.unit_size, self.n_jobs))

    def is_done(self, n: int) -> bool:
        return bool(self.complete[n // self.unit_size]) or n in self.done

    def missing(self, u: int) -> int:
        return 0 if self.complete[u] else sum(n not in self.done for n in self.jobs_of(u))

    @classmethod
    def load(cls, out: Path, plan: Plan, size: int, run_hash: str, writer: Writer | None = None) -> Progress:
        """Read every part's unit records, and the records of its tail and of its units with failures (with
        ``writer``: a record counts only if its image is there, as a resume needs)."""
        n_jobs = len(plan.jobs)
        n_units = -(-n_jobs // size)
        p = cls(size, n_jobs, np.zeros(n_units, bool))
        for part in sorted(out.glob("manifest-*.jsonl")):
            name = part.name[len("manifest-"):-len(".jsonl")]
            part_size = part.stat().st_size
            recs = read_units(out / f"units-{name}.bin", run_hash, n_units, part_size)
            whole = recs["missing"] == 0
            p.complete[recs["unit"][whole]] = True
            if whole.any():
                p.last_units[name] = int(recs["unit"][whole][-1])
            tail = int(recs["end"].max()) if len(recs) else 0
            regions = [(int(a), int(b)) for a, b in zip(recs["start"][~whole], recs["end"][~whole])]
            touched = set()
            with open(part, "rb") as f:
                for a, b in [*regions, (tail, part_size)]:
                    f.seek(a)
                    for r in _parse_records(f.read(b - a)):
                        if r.get("config_hash") != run_hash:
                            continue
                        try:
                            n = plan.index(r.get("job_id", ""))
                        except ValueError:
                            raise InputError(f"{part} records job {r.get('job_id')!r}, which the plan in "
                                             f"{out} does not have (a manifest from another folder?); "
                                             "nothing was changed: move that part away, or pass --new-run"
                                             ) from None
                        if a == tail:
                            touched.add(n // size)
                        if r.get("nan"):
                            p.failed.add(n)
                        elif writer is None or writer.has(r):
                            p.done.add(n)
            p.tails[name] = (tail, part_size, touched)
        p.failed -= p.done
        for u in {n // size for n in p.done}:
            if not p.complete[u] and all(n in p.done for n in p.jobs_of(u)):
                p.complete[u] = True
        p.done = {n for n in p.done if not p.complete[n // size]}
        return p
