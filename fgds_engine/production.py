"""Generate a planned synthetic dataset: sharded, resumable, safe to interrupt.

Work is cut into fixed *units* of consecutive jobs (one batch for ImageFolder output, ``samples_per_shard``
jobs = one tar for WebDataset output); unit u belongs to worker ``u % (shards * world)``. Batches are
therefore the same whatever the sharding or resume point, and since every sample is a pure function of its
job, an interrupted-and-resumed, a sharded or a multi-process run writes the same bytes as a single
uninterrupted one (same device and thread count: floating-point reductions depend on them).

Durability: images are written to a temp name and renamed; each worker appends one JSONL manifest record per
finished sample to its own part (the dataset's index), flushed and fsynced per batch (WebDataset: per tar,
after the tar's rename), and then, per finished unit, one 32-byte *unit record* (unit, the byte range of its
records in the part, how many of its jobs are still missing, a check) to its own ``units-*.bin``, fsynced. So
what is done is known from the unit records (a few bytes per unit, whatever the plan's size), plus the records
after a part's last unit record (a kill between the two appends) and those of units with failures, which
resume and status parse; a worker that finds such a tail in its own part records its units then. A worker
holds one flag per unit and the jobs of the batch it runs: its bookkeeping does not grow with the plan.

Identity: ``run.json`` records the run's identity, a hash of what determines the bytes (``run_identity``: an
option at its neutral value, the value that reproduces the behaviour before it existed, does not enter it;
``BYTES_VERSION`` is raised when a release changes the bytes of existing options). A folder written before
identities (its hash covered every option) resumes when its recorded configuration has the same identity.

Overlap: while the sampler produces batch k+1, a pool of ``write_workers`` threads encodes batch k (PNG /
JPEG / WebP: PIL releases the GIL) and one writer thread, in batch order, writes its files and then appends
its records. The sampling thread only waits when two batches are in flight (memory stays flat); a stop
drains them; an encoding or writing error surfaces in the sampling thread, and no later batch is written or
recorded after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .config import check_fields, option, parse_shard
from .data import InputError, progress_bar
from .plan import Job, Plan, derive_seed
from .writers import IMAGE_FORMATS, WRITERS, Encoding, OutputError, Writer, atomic_write

__all__ = ["GenerateOptions", "OutputError", "Worker", "generate_dataset", "run_identity", "status"]
FORMATS = tuple(WRITERS)
RUN_FILE = "run.json"
BYTES_VERSION = 1  # raise when a release changes the bytes that existing options give (folders then refuse)


def unit_size(format: str, batch_size: int, samples_per_shard: int) -> int:  # noqa: A002
    """Jobs per unit of work: one batch (ImageFolder), or one tar of whole batches (WebDataset)."""
    if format == "imagefolder":
        return batch_size
    return -(-samples_per_shard // batch_size) * batch_size


@dataclass(frozen=True)
class GenerateOptions:
    """Options of a generation run (the sampler's own are in ``SamplerConfig``).

    Args:
        batch_size: samples per sampler call, or "auto": the largest batch (and feedback chunk) that fits the
            device's free memory (``memory.plan_batch``; fixed on the CPU), resolved before the run starts and
            reused from ``run.json`` on resume.
        format: "imagefolder" (OUT/<class>/<job id>.png) or "webdataset" (OUT/shard-<unit>.tar).
        image_format: "png" (lossless, as the paper saved), "jpeg" or "webp"; quality (JPEG / WebP, 1-100)
            and png_level (PNG compression, 0-9) set the encoder.
        write_workers: threads that encode and write while the sampler runs (0: in the sampling loop); not
            part of the run's configuration (the bytes do not depend on it).
        samples_per_shard: jobs per WebDataset tar (rounded up to whole batches).
        max_retries: a sample that comes out NaN/inf is retried this many times with derived seeds.
        noise_level: noise augmentation of the CLIP image embedding (unCLIP pipelines).
        shard: (i, n): this invocation runs the i-th of n shards (SLURM arrays); torchrun ranks split further.
        new_run: archive the manifest of a run with another configuration instead of refusing to mix.
        verify: check every image of this worker's completed units (not only the last unit of each part, as a
            resume does) and regenerate the units that lack one.
    """

    batch_size: int | str = option(
        8, "samples per sampler call, or auto (the largest that fits the GPU's memory)")
    format: str = option("imagefolder", "imagefolder | webdataset")
    image_format: str = option("png", "png | jpeg | webp", neutral="png")
    quality: int = option(95, "JPEG / WebP quality", low=1, high=100, inert_unless="image_format")
    png_level: int = option(6, "PNG compression level (1: 4x faster to encode, ~15% larger)", low=0, high=9)
    write_workers: int = option(2, "threads encoding and writing images while the sampler runs (0: none)",
                                low=0, identity=False)
    samples_per_shard: int = option(256, "jobs per WebDataset tar", low=1)
    max_retries: int = option(2, "retries of a NaN sample (derived seeds)", low=0)
    noise_level: int = option(0, "unCLIP image-embedding noise augmentation", low=0)
    shard: tuple[int, int] = option((0, 1), "run shard i of n, as i/n", parse=parse_shard, metavar="I/N",
                                    identity=False)
    new_run: bool = option(False, "archive the manifest of a differently configured run and start over",
                           identity=False)
    verify: bool = option(False, "check every image this worker's unit records say is done, and regenerate "
                          "the units whose images are missing (reads every image: slow)", identity=False)

    def __post_init__(self):
        check_fields(self)
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an integer >= 1 or 'auto', got {self.batch_size!r}")
        if self.format not in FORMATS:
            raise InputError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(f"image_format must be one of {tuple(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.image_format == "png" and self.quality != 95:
            raise InputError("--quality is for --image-format jpeg or webp (PNG is lossless: --png-level)")
        if self.image_format != "png" and self.png_level != 6:
            raise InputError("--png-level is for --image-format png")
        if self.format == "imagefolder" and self.samples_per_shard != 256:
            raise InputError("--samples-per-shard is for --format webdataset (an ImageFolder has no shards)")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")

    @property
    def unit_size(self) -> int:
        return unit_size(self.format, self.batch_size, self.samples_per_shard)

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.image_format, self.quality, self.png_level)


@dataclass
class Worker:
    """Which part of the work this process runs: shard i of n, torch.distributed rank r of world w."""

    shard: int = 0
    shards: int = 1
    rank: int = 0
    world: int = 1

    @property
    def index(self) -> int:
        return self.shard * self.world + self.rank

    @property
    def count(self) -> int:
        return self.shards * self.world

    @property
    def tag(self) -> str:
        """Suffix of this worker's temp files: a worker cleans up only its own."""
        return f".w{self.index}of{self.count}"

    @property
    def manifest_name(self) -> str:
        return f"manifest-{self.part}.jsonl"

    @property
    def units_name(self) -> str:
        return f"units-{self.part}.bin"

    @property
    def part(self) -> str:
        return f"shard{self.shard}of{self.shards}-rank{self.rank}of{self.world}"


def recorded_batch(out: str | Path) -> tuple[int, int | None] | None:
    """(batch_size, feedback_chunk) of the run recorded in OUT/run.json, if there is one."""
    run_file = Path(out) / RUN_FILE
    if not run_file.exists():
        return None
    config = json.loads(run_file.read_text())["config"]
    return config["options"]["batch_size"], config["sampler"].get("feedback_chunk")


def config_hash(config: dict) -> str:
    """The previous release's run hash: every field of the configuration (kept to name its records)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _identity_rules() -> dict[str, dict[str, dict]]:
    """Per table of the run configuration, the fields that declare ``neutral=`` / ``inert_unless=``."""
    from .config import RuntimeOptions, SamplerConfig
    from .options import ModelOptions

    tables = {"sampler": (SamplerConfig, RuntimeOptions), "models": (ModelOptions,),
              "options": (GenerateOptions,)}
    keys = {"neutral", "inert_unless", "identity"}
    return {t: {f.name: f.metadata for cls in classes for f in dataclasses.fields(cls)
                if keys & set(f.metadata)} for t, classes in tables.items()}


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_identity(config: dict) -> str:
    """SHA-256 (16 hex digits) of what determines a run's bytes: its configuration, less the options at
    their neutral value (``option(neutral=...)``: the value that reproduces the behaviour before the option
    existed), the options that only act beside another one (``option(inert_unless=...)``) when that one is
    neutral or absent, and those that never change the bytes (``option(identity=False)``: sharding, threads
    of the writer), plus ``BYTES_VERSION``. So a release that adds an option leaves the identity of every
    existing folder as it was."""
    config = _plain(config)
    for table, rules in _identity_rules().items():
        values = config.get(table)
        if not isinstance(values, dict):
            continue
        neutral = {k for k, m in rules.items() if "neutral" in m and k in values
                   and values[k] == _plain(m["neutral"])}
        inert = {k for k, m in rules.items() if m.get("inert_unless") is not None
                 and (m["inert_unless"] not in values or m["inert_unless"] in neutral)}
        inert |= {k for k, m in rules.items() if m.get("identity") is False}
        for k in neutral | inert:
            values.pop(k, None)
    return config_hash({"bytes_version": BYTES_VERSION, "config": config})


# ---------------------------------------------------------------------------------------------- manifest


def _parse_records(data: bytes) -> list[dict]:
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut by a kill; repaired when its writer reopens the part
    return records


def _cut_partial(path: Path, record: int) -> int:
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
            self.size = _cut_partial(path, 1)
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


def _check(unit, start, end, missing, key: int):
    """32 bits that tie a unit record to its fields and its run (numpy arrays or ints)."""
    if isinstance(unit, np.ndarray):
        u64 = [np.asarray(v).astype(np.uint64) for v in (unit, start, end, missing)]
        mixed = [(v * np.uint64(m)) & np.uint64(0xFFFFFFFF) for v, m in zip(u64, _MIX)]
        return (mixed[0] ^ mixed[1] ^ mixed[2] ^ mixed[3] ^ np.uint64(key)).astype(np.uint32)
    mixed = [(v * m) & 0xFFFFFFFF for v, m in zip((unit, start, end, missing), _MIX)]
    return mixed[0] ^ mixed[1] ^ mixed[2] ^ mixed[3] ^ key


def _run_key(run_hash: str) -> int:
    return int(hashlib.sha256(run_hash.encode()).hexdigest()[:8], 16)


class UnitLog:
    """One worker's unit records (``units-*.bin``): appended and fsynced after the unit's manifest records."""

    def __init__(self, path: Path, run_hash: str):
        self.path, self.key = path, _run_key(run_hash)
        try:
            _cut_partial(path, UNIT_RECORD.itemsize)
            self.f = open(path, "ab")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def append(self, rows: list[tuple[int, int, int, int]]) -> None:
        """(unit, start, end, missing) per finished unit."""
        if rows:
            recs = np.array([(*r, _check(*r, self.key)) for r in rows], dtype=UNIT_RECORD)
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
        good = recs["check"] == _check(recs["unit"], recs["start"], recs["end"], recs["missing"],
                                       _run_key(run_hash))
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


# ---------------------------------------------------------------------------------------------- the run


def _json_or_error(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is damaged (cut short or edited?); nothing was changed: restore it, or "
                         "pass --new-run to archive the run's manifest and start over") from None


def start_run(out: Path, run_config: dict, plan: Plan, *, new_run: bool, worker: Worker) -> str:
    """Record (or check) the run's identity in OUT/run.json; returns the hash its manifest records carry.

    A run.json of the previous release (no identity recorded) resumes when its configuration has the same
    identity and its plan is this one; its records keep their hash. Otherwise one line says why and how to
    go on, and nothing is changed (unless --new-run, which archives the run's files as previous-*)."""
    identity = run_identity(run_config)
    run_file = out / RUN_FILE
    if run_file.exists():
        old = _json_or_error(run_file)
        if "config" not in old or "config_hash" not in old:
            raise InputError(f"{run_file} is not a run record of fgds-engine; nothing was changed: move it "
                             "away")
        version = old.get("bytes_version", 1)
        legacy = "identity" not in old
        same_plan = old["config"].get("plan") == (plan.job_list_digest() if legacy and plan.is_table
                                                  else run_config["plan"])
        old_identity = old.get("identity") or run_identity({**old["config"], "plan": run_config["plan"]})
        if version != BYTES_VERSION:
            why = ("was generated by a release whose images differ from this one's (bytes version "
                   f"{version}, this release {BYTES_VERSION}): finish it with that release, or pass "
                   "--new-run")
        elif not same_plan:
            why = ("holds a run of another plan (planned again, or plan.json copied from another folder?): "
                   "plan it as it was, or pass --new-run")
        elif old_identity != identity:
            why = (f"holds a run with another configuration (identity {old_identity}, this one {identity}): "
                   "pass --new-run")
        else:
            if legacy and worker.index == 0:  # recorded once: later resumes compare identities directly
                atomic_write(run_file, _run_json(old["config_hash"], identity, run_config), worker.tag)
            return old["config_hash"]
        if not new_run:
            raise InputError(f"{out} {why} to archive its manifest and start over, or write to another "
                             "folder; nothing was changed")
        if worker.index == 0:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            for p in [run_file, *out.glob("manifest-*.jsonl"), *out.glob("units-*.bin")]:
                os.replace(p, out / f"previous-{stamp}-{p.name}")
    if not run_file.exists():  # every worker writes the same content; the rename makes any order safe
        atomic_write(run_file, _run_json(identity, identity, run_config), worker.tag)
    return identity


def _run_json(records_hash: str, identity: str, config: dict) -> bytes:
    return (json.dumps({"config_hash": records_hash, "identity": identity, "bytes_version": BYTES_VERSION,
                        "config": config}, indent=1, sort_keys=True, default=str) + "\n").encode()


class StopRequest:
    """SIGINT / SIGTERM set a flag; the run finishes its batch, flushes and stops."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class RunReport:
    planned: int
    done_before: int
    generated: int
    failed: int
    retries: int
    sampler_s: float
    wall_s: float
    stopped_by: int | None = None

    @property
    def outside_sampler_share(self) -> float:
        return 1 - self.sampler_s / self.wall_s if self.wall_s > 0 else 0.0


# sample_fn(prompts, exemplar paths or None, labels, seeds) -> (uint8 images [B, H, W, 3], criterion, nan)
SampleFn = Callable[[list[str], list[str] | None, list[int], list[int]], tuple[np.ndarray, list, list]]


def generate_dataset(plan: Plan, out: str | Path, sample_fn: SampleFn, options: GenerateOptions,
                     run_config: dict, *, worker: Worker | None = None, progress: bool = True,
                     log=print) -> RunReport:
    """Run this worker's units of the plan, skipping what the unit records (and manifest tails) hold."""
    out, worker = Path(out), worker or Worker(*options.shard)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test{worker.tag}"  # one per worker: another worker's unlink cannot race it
    atomic_write(probe, b"", worker.tag)  # a read-only or full folder fails here, early
    probe.unlink(missing_ok=True)
    recorded = asdict(options) | dict.fromkeys(("shard", "new_run", "write_workers", "verify"))
    run_hash = start_run(out, {**run_config, "plan": plan.digest(), "options": recorded}, plan,
                         new_run=options.new_run, worker=worker)
    for tmp in out.glob(f"**/.*{worker.tag}.tmp"):
        tmp.unlink(missing_ok=True)  # this worker's leftovers of a killed run
    writer = WRITERS[options.format](out, worker.tag, options.encoding)
    size = options.unit_size
    mine = range(worker.index, -(-len(plan.jobs) // size), worker.count)
    manifest = ManifestPart(out / worker.manifest_name)  # its partial last line cut before it is read
    units = UnitLog(out / worker.units_name, run_hash)
    try:
        done = Progress.load(out, plan, size, run_hash, writer)
        _check_images(done, plan, writer, out, mine, options.verify, log)
        _record_tail(done, units, worker.part)
    except BaseException:
        manifest.close()
        units.close()
        raise
    run = _Run(sample_fn, options, writer, done, plan, run_hash, manifest=manifest, units=units,
               unit_start=manifest.size)
    lengths = np.minimum(size, len(plan.jobs) - np.asarray(mine, dtype=np.int64) * size)
    total = int(lengths.sum())
    done_before = int(lengths[done.complete[mine.start::mine.step]].sum()) + sum(
        1 for n in done.done if (n // size) % worker.count == worker.index)
    run.report = RunReport(total, done_before, 0, 0, 0, 0.0, 0.0)
    run.bar = progress_bar(None, progress, total=total, initial=done_before, unit="img",
                           desc=f"generate [worker {worker.index}]")
    pool = ThreadPoolExecutor(options.write_workers) if options.write_workers else None
    store = ThreadPoolExecutor(1) if pool is not None else None  # one thread: batches stay in order
    run.encode = _Inline(options.encoding.encode) if pool is None else (
        lambda image: pool.submit(options.encoding.encode, image))
    run.store = _Inline(lambda items: _write_batch(run, items)) if store is None else (
        lambda items: store.submit(_write_batch, run, items))
    run.end_unit = _Inline(lambda u, missing: _end_unit(run, u, missing)) if store is None else (
        lambda u, missing: store.submit(_end_unit, run, u, missing))
    try:
        with StopRequest() as run.stop:
            for u in mine:
                if done.complete[u]:
                    continue
                if not _run_unit(run, u):
                    break
            _drain(run)  # the last batch in flight (units of one batch overlap across units)
            run.report.stopped_by = run.stop.signum
    finally:
        for ex in (store, pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        run.manifest.close()
        run.units.close()
        if run.bar is not None:
            run.bar.close()
    run.report.wall_s = time.perf_counter() - t_start
    return run.report


def _check_images(done: Progress, plan: Plan, writer: Writer, out: Path, mine: range, verify: bool,
                  log) -> None:
    """The images of the last complete unit of every part are there (or, with ``verify``, those of every
    complete unit of this worker: the units that lack one are generated again). A kill cannot leave a unit
    record without its images (they are renamed into place first), so a disagreement means they were
    removed: one line, nothing changed."""
    if verify:
        redo = [u for u in mine if done.complete[u] and not all(
            writer.has(writer.locate(u, plan.jobs[n])) for n in done.jobs_of(u))]
        done.complete[redo] = False
        log(f"verify: {len(redo)} unit(s) of this worker lack an image and are generated again")
        return
    for name, u in done.last_units.items():
        for n in done.jobs_of(u):
            where = writer.locate(u, plan.jobs[n])
            if not writer.has(where):
                raise InputError(f"{out / f'units-{name}.bin'} records unit {u} as done but {where['file']} "
                                 f"lacks job {where['job_id']} (removed?); nothing was changed: resume with "
                                 "--verify to check every recorded image and generate the missing ones again")


def _record_tail(done: Progress, units: UnitLog, part: str) -> None:
    """This worker's records after its last unit record (a kill between the two appends, or a part of the
    previous release): their units get unit records now, so the next resume need not parse them."""
    if part in done.tails:
        a, b, touched = done.tails[part]
        units.append([(u, a, b, done.missing(u)) for u in sorted(touched)])


@dataclass
class _Run:
    """What the units of one worker's run share."""

    sample_fn: SampleFn
    options: GenerateOptions
    writer: Writer
    progress: Progress
    plan: Plan
    run_hash: str
    report: RunReport | None = None
    manifest: ManifestPart | None = None
    units: UnitLog | None = None
    unit_start: int = 0  # where the next unit's records begin in the manifest part (the store thread's)
    bar: object = None
    stop: StopRequest | None = None
    encode: Callable[[np.ndarray], Future] | None = None  # image -> future of its bytes
    store: Callable[[list], Future] | None = None  # a batch's [(job, bytes future, record)] -> written
    end_unit: Callable[[int, int], Future] | None = None  # (unit, jobs missing) -> records final, recorded
    in_flight: deque = field(default_factory=deque)  # futures of the batches sampled, not yet written
    store_failed: bool = False


class _Inline:
    """``encode`` without a pool: the bytes now, as a finished future (the loop is the same either way)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args) -> Future:
        f = Future()
        f.set_result(self.fn(*args))
        return f


def _run_unit(run: _Run, u: int) -> bool:
    """Generate one unit; False if a stop was requested (the unit's finished batches are kept, except in a
    whole-unit format, where an unfinished unit is regenerated whole on resume)."""
    writer, batch_size, report, progress = run.writer, run.options.batch_size, run.report, run.progress
    skip_done = not writer.whole_units
    writer.start_unit(u)
    indices = progress.jobs_of(u)
    missing = 0
    for b in range(0, len(indices), batch_size):
        batch = [(n, run.plan.jobs[n]) for n in indices[b:b + batch_size]]
        if skip_done and all(progress.is_done(n) for n, _ in batch):
            continue
        items = []
        for (n, job), (image, crit, nan, retries, seed) in zip(batch, _run_batch(
                [j for _, j in batch], run.sample_fn, run.options, report)):
            if skip_done and progress.is_done(n):
                continue  # the batch re-ran for the others: same bytes, nothing to rewrite
            rec = {"job_id": job.job_id, "class": job.class_name, "class_index": job.class_index,
                   "seed": job.seed, "seed_used": seed, "exemplar": job.exemplar, "criterion": crit,
                   "nan": nan, "retries": retries, "config_hash": run.run_hash, "file": writer.file_for(job)}
            items.append((job, None if nan else run.encode(image), rec))
            report.generated += not nan
            report.failed += nan
            report.retries += retries
            missing += nan
        run.in_flight.append(run.store(items))  # encoded and written while the next batch is sampled
        while len(run.in_flight) > 1:
            run.in_flight.popleft().result()
        if run.stop.signum is not None and b + batch_size < len(indices):
            _drain(run)
            return False
    if writer.whole_units:  # the unit's file is written from every sample of it
        _drain(run)
    # on the writer's thread, after the unit's batches: the writer is never touched from two threads (an
    # end_unit here used to take the records of a batch the store thread was still writing)
    run.in_flight.append(run.end_unit(u, missing))
    if writer.whole_units:  # written before the next unit's start_unit resets the writer
        _drain(run)
    if run.stop.signum is not None:
        _drain(run)
        return False
    return True


def _write_batch(run: _Run, items: list) -> None:
    """One batch: its encoded images to the writer in order, then its final records (on the writer thread;
    after a failure, later batches are neither written nor recorded)."""
    if run.store_failed:
        return
    try:
        for job, encoded, rec in items:
            run.writer.write(job, None if encoded is None else encoded.result(), rec)
        run.manifest.append(run.writer.end_batch())
    except BaseException:
        run.store_failed = True
        raise
    if run.bar is not None:
        run.bar.update(len(items))
        run.bar.set_postfix(retries=run.report.retries, failed=run.report.failed)


def _end_unit(run: _Run, u: int, missing: int) -> None:
    """Flush the unit, record what is final, then its unit record (on the writer thread; nothing after a
    failed batch)."""
    if run.store_failed:
        return
    try:
        run.manifest.append(run.writer.end_unit())
        run.units.append([(u, run.unit_start, run.manifest.size, missing)])
    except BaseException:
        run.store_failed = True
        raise
    run.unit_start = run.manifest.size


def _drain(run: _Run) -> None:
    """Wait until every batch in flight is written (the first error is raised here)."""
    while run.in_flight:
        run.in_flight.popleft().result()


def _run_batch(batch: list[Job], sample_fn: SampleFn, options: GenerateOptions, report: RunReport):
    """[(image, criterion, nan, retries, seed used)] per job; NaN samples retried with derived seeds."""
    results, seeds = {}, {j.job_id: j.seed for j in batch}
    pending, attempt = list(batch), 0
    while pending:
        t0 = time.perf_counter()
        images, crits, nans = sample_fn([j.prompt for j in pending], [j.exemplar for j in pending],
                                        [j.class_index for j in pending], [seeds[j.job_id] for j in pending])
        report.sampler_s += time.perf_counter() - t0
        retry = []
        for j, img, c, nan in zip(pending, images, crits, nans):
            if nan and attempt < options.max_retries:
                seeds[j.job_id] = derive_seed(j.seed, f"retry:{attempt + 1}")
                retry.append(j)
            else:
                results[j.job_id] = (img, None if nan else float(c), bool(nan), attempt, seeds[j.job_id])
        pending, attempt = retry, attempt + 1
    return [results[j.job_id] for j in batch]


# ---------------------------------------------------------------------------------------------- status


def _recorded(out: Path, plan: Plan) -> tuple[dict, Progress] | None:
    """run.json's content and the run's progress, if a run was started in ``out``."""
    if not (out / RUN_FILE).exists():
        return None
    run = _json_or_error(out / RUN_FILE)
    o = run["config"]["options"]
    size = unit_size(o["format"], o["batch_size"], o.get("samples_per_shard", 256))
    return run, Progress.load(out, plan, size, run["config_hash"])


def _job_states(plan: Plan, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """(done, failed) flags of every job."""
    n = len(plan.jobs)
    if progress is None:
        return np.zeros(n, bool), np.zeros(n, bool)
    done = np.repeat(progress.complete, progress.unit_size)[:n]
    done[np.fromiter(progress.done, np.int64, len(progress.done))] = True
    failed = np.zeros(n, bool)
    failed[np.fromiter(progress.failed, np.int64, len(progress.failed))] = True
    return done, failed


def status(plan: Plan, out: str | Path) -> dict[str, dict[str, int]]:
    """Per class: planned, done, failed (NaN after every retry), pending, from every part's unit records
    (and the records they do not cover)."""
    recorded = _recorded(Path(out), plan)
    done, failed = _job_states(plan, None if recorded is None else recorded[1])
    classes = plan.class_array()
    k = len(plan.classes)
    counts = {key: np.bincount(classes[mask], minlength=k) for key, mask in
              (("planned", np.ones(len(classes), bool)), ("done", done), ("failed", failed))}
    return {c: {"planned": int(counts["planned"][i]), "done": int(counts["done"][i]),
                "failed": int(counts["failed"][i]),
                "pending": int(counts["planned"][i] - counts["done"][i] - counts["failed"][i])}
            for i, c in enumerate(plan.classes)}


def preview_sheet(plan: Plan, out: str | Path, path: str | Path, *, per_class: int = 8, cell: int = 64,
                  label_width: int = 180) -> tuple[int, int]:
    """A contact sheet of the run: one row per class, its first ``per_class`` generated images (scaled to
    ``cell`` pixels), labelled with the class, done / planned and failures; written atomically as PNG.
    Returns the sheet's (width, height)."""
    import io

    from PIL import Image, ImageDraw

    out = Path(out)
    recorded = _recorded(out, plan)
    writer, firsts = None, {}
    if recorded is not None:
        run, progress = recorded
        o = run["config"]["options"]  # a run.json from before image formats holds PNG
        encoding = Encoding(o.get("image_format", "png"), o.get("quality", 95), o.get("png_level", 6))
        writer = WRITERS[o["format"]](out, encoding=encoding)
        done, _ = _job_states(plan, progress)
        idx = np.flatnonzero(done)
        classes = plan.class_array()[idx]
        order = np.argsort(classes, kind="stable")
        for c in range(len(plan.classes)):
            lo, hi = np.searchsorted(classes[order], [c, c + 1])
            firsts[c] = [int(idx[order[j]]) for j in range(lo, min(hi, lo + per_class))]
    table = status(plan, out)
    size = (label_width + per_class * cell, max(len(plan.classes), 1) * cell)
    sheet = Image.new("RGB", size, (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for row, c in enumerate(plan.classes):
        t = table[c]
        draw.text((6, row * cell + 6), f"{c}\n{t['done']}/{t['planned']} done\n{t['failed']} failed",
                  fill=(230, 230, 230))
        for col, n in enumerate(firsts.get(row, [])):
            data = writer.read(writer.locate(n // progress.unit_size, plan.jobs[n]))
            if data is None:
                continue
            with Image.open(io.BytesIO(data)) as im:
                thumb = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(thumb, (label_width + col * cell, row * cell))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return size
