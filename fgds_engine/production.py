"""Generate a planned synthetic dataset: sharded, resumable, safe to interrupt.

Work is cut into fixed *units* of consecutive jobs (one batch for ImageFolder output, ``samples_per_shard``
jobs = one tar for WebDataset output); unit u belongs to worker ``u % (shards * world)``. Batches are
therefore the same whatever the sharding or resume point, and since every sample is a pure function of its
job, an interrupted-and-resumed, a sharded or a multi-process run writes the same bytes as a single
uninterrupted one (same device and thread count: floating-point reductions depend on them).

Durability: images are written to a temp name and renamed; each worker appends one JSONL manifest record per
finished sample to its own part, flushed and fsynced per batch (WebDataset: per tar, after the tar's rename).
A job counts as done when a record of the current run says so and its image is readable.

Overlap: while the sampler produces batch k+1, a pool of ``write_workers`` threads encodes batch k (PNG /
JPEG / WebP: PIL releases the GIL) and one writer thread, in batch order, writes its files and then appends
its records. The sampling thread only waits when two batches are in flight (memory stays flat); a stop
drains them; an encoding or writing error surfaces in the sampling thread, and no later batch is written or
recorded after it.
"""

from __future__ import annotations

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

__all__ = ["GenerateOptions", "OutputError", "Worker", "generate_dataset", "status"]
FORMATS = tuple(WRITERS)
RUN_FILE = "run.json"


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
    """

    batch_size: int | str = option(
        8, "samples per sampler call, or auto (the largest that fits the GPU's memory)")
    format: str = option("imagefolder", "imagefolder | webdataset")
    image_format: str = option("png", "png | jpeg | webp")
    quality: int = option(95, "JPEG / WebP quality", low=1, high=100)
    png_level: int = option(6, "PNG compression level (1: 4x faster to encode, ~15% larger)", low=0, high=9)
    write_workers: int = option(2, "threads encoding and writing images while the sampler runs (0: none)",
                                low=0)
    samples_per_shard: int = option(256, "jobs per WebDataset tar", low=1)
    max_retries: int = option(2, "retries of a NaN sample (derived seeds)", low=0)
    noise_level: int = option(0, "unCLIP image-embedding noise augmentation", low=0)
    shard: tuple[int, int] = option((0, 1), "run shard i of n, as i/n", parse=parse_shard, metavar="I/N")
    new_run: bool = option(False, "archive the manifest of a differently configured run and start over")

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
        if self.format == "imagefolder":
            return self.batch_size
        return -(-self.samples_per_shard // self.batch_size) * self.batch_size

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
        return f"manifest-shard{self.shard}of{self.shards}-rank{self.rank}of{self.world}.jsonl"


def recorded_batch(out: str | Path) -> tuple[int, int | None] | None:
    """(batch_size, feedback_chunk) of the run recorded in OUT/run.json, if there is one."""
    run_file = Path(out) / RUN_FILE
    if not run_file.exists():
        return None
    config = json.loads(run_file.read_text())["config"]
    return config["options"]["batch_size"], config["sampler"].get("feedback_chunk")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- manifest


def read_manifests(out: Path, run_hash: str | None = None) -> dict[str, dict]:
    """The last record per job over all manifest parts (of run ``run_hash`` if given)."""
    records: dict[str, dict] = {}
    for part in sorted(out.glob("manifest-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill; repaired when its writer reopens the part
            if run_hash is None or r.get("config_hash") == run_hash:
                records[r["job_id"]] = r
    return records


class ManifestPart:
    """One worker's JSONL manifest part: a partial last line (a kill mid-write) is cut on open."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        try:
            self.f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        try:
            self.f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------- the run


def start_run(out: Path, run_config: dict, *, new_run: bool, worker: Worker) -> str:
    """Record (or check) the run's configuration in OUT/run.json; returns its hash."""
    h = config_hash(run_config)
    run_file = out / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old["config_hash"] != h:
            if not new_run:
                raise InputError(f"{out} holds a run with another configuration (hash {old['config_hash']}, "
                                 f"this one {h}); pass --new-run to archive its manifest and start over, or "
                                 "write to another folder")
            if worker.index == 0:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                for p in [run_file, *out.glob("manifest-*.jsonl")]:
                    os.replace(p, out / f"previous-{stamp}-{p.name}")
    if not run_file.exists():  # every worker writes the same content; the rename makes any order safe
        atomic_write(run_file, (json.dumps({"config_hash": h, "config": run_config}, indent=1,
                                            sort_keys=True, default=str) + "\n").encode(), worker.tag)
    return h


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
    """Run this worker's units of the plan, skipping what the manifest already holds."""
    out, worker = Path(out), worker or Worker(*options.shard)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test{worker.tag}"  # one per worker: another worker's unlink cannot race it
    atomic_write(probe, b"", worker.tag)  # a read-only or full folder fails here, early
    probe.unlink(missing_ok=True)
    run_hash = start_run(out, {**run_config, "plan": plan.digest(), "options": asdict(options) | {
        "shard": None, "new_run": None, "write_workers": None}}, new_run=options.new_run, worker=worker)
    for tmp in out.glob(f"**/.*{worker.tag}.tmp"):
        tmp.unlink(missing_ok=True)  # this worker's leftovers of a killed run
    writer = WRITERS[options.format](out, worker.tag, options.encoding)
    run = _Run(sample_fn, options, writer, read_manifests(out, run_hash), run_hash)
    size = options.unit_size
    units = [plan.jobs[i:i + size] for i in range(0, len(plan.jobs), size)]
    mine = [(u, jobs) for u, jobs in enumerate(units) if u % worker.count == worker.index]
    total = sum(len(j) for _, j in mine)
    done_before = sum(run.done(j) for _, jobs in mine for j in jobs)
    run.report = RunReport(total, done_before, 0, 0, 0, 0.0, 0.0)
    run.manifest = ManifestPart(out / worker.manifest_name)
    run.bar = progress_bar(None, progress, total=total, initial=done_before, unit="img",
                           desc=f"generate [worker {worker.index}]")
    pool = ThreadPoolExecutor(options.write_workers) if options.write_workers else None
    store = ThreadPoolExecutor(1) if pool is not None else None  # one thread: batches stay in order
    run.encode = _Inline(options.encoding.encode) if pool is None else (
        lambda image: pool.submit(options.encoding.encode, image))
    run.store = _Inline(lambda items: _write_batch(run, items)) if store is None else (
        lambda items: store.submit(_write_batch, run, items))
    run.end_unit = _Inline(lambda: _end_unit(run)) if store is None else (
        lambda: store.submit(_end_unit, run))
    try:
        with StopRequest() as run.stop:
            for u, jobs in mine:
                if all(run.done(j) for j in jobs):
                    continue
                if not _run_unit(run, u, jobs):
                    break
            _drain(run)  # the last batch in flight (units of one batch overlap across units)
            run.report.stopped_by = run.stop.signum
    finally:
        for ex in (store, pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        run.manifest.close()
        if run.bar is not None:
            run.bar.close()
    run.report.wall_s = time.perf_counter() - t_start
    return run.report


@dataclass
class _Run:
    """What the units of one worker's run share."""

    sample_fn: SampleFn
    options: GenerateOptions
    writer: Writer
    records: dict[str, dict]
    run_hash: str
    report: RunReport | None = None
    manifest: ManifestPart | None = None
    bar: object = None
    stop: StopRequest | None = None
    known: dict[str, bool] = field(default_factory=dict)
    encode: Callable[[np.ndarray], Future] | None = None  # image -> future of its bytes
    store: Callable[[list], Future] | None = None  # a batch's [(job, bytes future, record)] -> written
    end_unit: Callable[[], Future] | None = None  # the unit flushed and its records final, after its batches
    in_flight: deque = field(default_factory=deque)  # futures of the batches sampled, not yet written
    store_failed: bool = False

    def done(self, job: Job) -> bool:
        """A record of this run says the job succeeded and its image is there."""
        if job.job_id not in self.known:
            r = self.records.get(job.job_id)
            self.known[job.job_id] = r is not None and not r["nan"] and self.writer.has(r)
        return self.known[job.job_id]


class _Inline:
    """``encode`` without a pool: the bytes now, as a finished future (the loop is the same either way)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args) -> Future:
        f = Future()
        f.set_result(self.fn(*args))
        return f


def _run_unit(run: _Run, u: int, jobs: list[Job]) -> bool:
    """Generate one unit; False if a stop was requested (the unit's finished batches are kept, except in a
    whole-unit format, where an unfinished unit is regenerated whole on resume)."""
    writer, batch_size, report = run.writer, run.options.batch_size, run.report
    skip_done = not writer.whole_units
    writer.start_unit(u)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        if skip_done and all(run.done(j) for j in batch):
            continue
        items = []
        for job, (image, crit, nan, retries, seed) in zip(batch, _run_batch(batch, run.sample_fn, run.options,
                                                                              report)):
            if skip_done and run.done(job):
                continue  # the batch re-ran for the others: same bytes, nothing to rewrite
            rec = {"job_id": job.job_id, "class": job.class_name, "class_index": job.class_index,
                   "seed": job.seed, "seed_used": seed, "exemplar": job.exemplar, "criterion": crit,
                   "nan": nan, "retries": retries, "config_hash": run.run_hash, "file": writer.file_for(job)}
            items.append((job, None if nan else run.encode(image), rec))
            report.generated += not nan
            report.failed += nan
            report.retries += retries
        run.in_flight.append(run.store(items))  # encoded and written while the next batch is sampled
        while len(run.in_flight) > 1:
            run.in_flight.popleft().result()
        if run.stop.signum is not None:
            _drain(run)
            return False
    if writer.whole_units:  # the unit's file is written from every sample of it
        _drain(run)
    # on the writer's thread, after the unit's batches: the writer is never touched from two threads (an
    # end_unit here used to take the records of a batch the store thread was still writing)
    run.in_flight.append(run.end_unit())
    if writer.whole_units:  # written before the next unit's start_unit resets the writer
        _drain(run)
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


def _end_unit(run: _Run) -> None:
    """Flush the unit and record what is final (on the writer thread; nothing after a failed batch)."""
    if not run.store_failed:
        run.manifest.append(run.writer.end_unit())


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


def status(plan: Plan, out: str | Path) -> dict[str, dict[str, int]]:
    """Per class: planned, done, failed (NaN after every retry), pending, from all manifest parts."""
    out = Path(out)
    run_hash = json.loads((out / RUN_FILE).read_text())["config_hash"] if (out / RUN_FILE).exists() else None
    records = read_manifests(out, run_hash) if run_hash else {}
    table = {c: {"planned": 0, "done": 0, "failed": 0, "pending": 0} for c in plan.classes}
    for j in plan.jobs:
        row, r = table[j.class_name], records.get(j.job_id)
        row["planned"] += 1
        key = "pending" if r is None else "failed" if r["nan"] else "done"
        row[key] += 1
    return table


def preview_sheet(plan: Plan, out: str | Path, path: str | Path, *, per_class: int = 8, cell: int = 64,
                  label_width: int = 180) -> tuple[int, int]:
    """A contact sheet of the run: one row per class, its first ``per_class`` generated images (scaled to
    ``cell`` pixels), labelled with the class, done / planned and failures; written atomically as PNG.
    Returns the sheet's (width, height)."""
    import io

    from PIL import Image, ImageDraw

    out = Path(out)
    run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else None
    records = read_manifests(out, run["config_hash"]) if run else {}
    writer = None
    if run is not None:
        o = run["config"]["options"]  # a run.json from before image formats holds PNG
        encoding = Encoding(o.get("image_format", "png"), o.get("quality", 95), o.get("png_level", 6))
        writer = WRITERS[o["format"]](out, encoding=encoding)
    table = status(plan, out)
    size = (label_width + per_class * cell, max(len(plan.classes), 1) * cell)
    sheet = Image.new("RGB", size, (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    by_class: dict[str, list[dict]] = {c: [] for c in plan.classes}
    for job in plan.jobs:
        r = records.get(job.job_id)
        if r is not None and not r["nan"] and len(by_class[job.class_name]) < per_class:
            by_class[job.class_name].append(r)
    for row, c in enumerate(plan.classes):
        t = table[c]
        draw.text((6, row * cell + 6), f"{c}\n{t['done']}/{t['planned']} done\n{t['failed']} failed",
                  fill=(230, 230, 230))
        for col, r in enumerate(by_class[c]):
            data = writer.read(r) if writer is not None else None
            if data is None:
                continue
            with Image.open(io.BytesIO(data)) as im:
                thumb = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(thumb, (label_width + col * cell, row * cell))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return size
