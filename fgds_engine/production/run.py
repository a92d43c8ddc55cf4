"""One worker's run: its units of the plan, sampled, written and recorded (``generate_dataset``).

Work is cut into fixed *units* of consecutive jobs (``options.unit_size``); unit u belongs to worker
``u % (shards * world)``. A worker skips what the journal says is done, samples each remaining unit batch by
batch (NaN samples retried with derived seeds), and hands each batch to the write pipeline.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from ..plan import Job, Plan, derive_seed
from ..progress_bars import progress_bar
from ..writers import WRITERS, Writer, atomic_write
from .identity import start_run
from .journal import ManifestPart, Progress, UnitLog
from .lease import PartLease
from .options import GenerateOptions, Worker
from .pipeline import WritePipeline
from .store import (
    JournalMirror,
    ObjectStore,
    StoredWriter,
    parse_upload_options,
    pull_journal,
    push_run_files,
)


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


class GeneratedBatch(NamedTuple):
    """What a sample function returns for a batch of jobs (a plain 3-tuple in this order is accepted)."""

    images: np.ndarray  # uint8 [B, H, W, 3] (or [B, H, W])
    criterion: list  # per sample: the criterion of the finished image
    nan: list  # per sample: True where it came out NaN / inf


class JobResult(NamedTuple):
    """One job's outcome after its retries."""

    image: np.ndarray
    criterion: float | None  # None for a failed sample
    nan: bool
    retries: int
    seed_used: int


# sample_fn(prompts, exemplar paths or None, labels, seeds) -> GeneratedBatch
SampleFn = Callable[[list[str], list[str] | None, list[int], list[int]], GeneratedBatch]


def generate_dataset(plan: Plan, out: str | Path, sample_fn: SampleFn, options: GenerateOptions,
                     run_config: dict, *, worker: Worker | None = None, progress: bool = True,
                     log=print, lease: PartLease | None = None, store: ObjectStore | None = None
                     ) -> RunReport:
    """Run this worker's units of the plan, skipping what the unit records (and manifest tails) hold.

    The worker holds its part's lease for the whole run (``lease``: taken by the caller, e.g. before it
    loads the models; else taken here): a second live worker of the same part is refused in one line.
    With ``options.upload``, ``out`` stages and the store holds the run (``store``: opened and checked by the
    caller; else here; ``production.store``)."""
    out, worker = Path(out), worker or Worker(*options.shard)
    if lease is None:
        with PartLease.acquire(out, worker) as own:
            return generate_dataset(plan, out, sample_fn, options, run_config, worker=worker,
                                    progress=progress, log=log, lease=own, store=store)
    if options.upload and store is None:
        store = open_store(options, worker)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test{worker.tag}"  # one per worker: another worker's unlink cannot race it
    atomic_write(probe, b"", worker.tag)  # a read-only or full folder fails here, early
    probe.unlink(missing_ok=True)
    recorded = {k: v for k, v in dataclasses.asdict(options).items() if k not in UPLOAD_FIELDS}
    recorded |= dict.fromkeys(("shard", "new_run", "write_workers", "verify"))  # where it is stored: not what
    run_hash = start_run(out, {**run_config, "plan": plan.digest(), "options": recorded}, plan,
                         new_run=options.new_run, worker=worker)
    for tmp in out.glob(f"**/.*{worker.tag}.tmp"):
        tmp.unlink(missing_ok=True)  # this worker's leftovers of a killed run
    writer = WRITERS[options.format](out, worker.tag, options.encoding)
    mirror = None
    if store is not None:
        push_run_files(store, out)
        ends = pull_journal(store, out, worker.part, tag=worker.tag)  # where the store is further
        writer = StoredWriter(writer, store)
        mirror = JournalMirror(store, out, worker.part, ends.get(worker.part, (0, 0)))
    size = options.unit_size
    mine = range(worker.index, -(-len(plan.jobs) // size), worker.count)
    manifest = ManifestPart(out / worker.manifest_name)  # its partial last line cut before it is read
    units = UnitLog(out / worker.units_name, run_hash)
    try:
        done = Progress.load(out, plan, size, run_hash, writer)
        _check_images(done, plan, writer, out, mine, options.verify, log)
        _record_tail(done, units, worker.part)
        if mirror is not None:
            mirror.sync()  # what staging holds beyond the store (a kill before the last mirror), up first
    except BaseException:
        manifest.close()
        units.close()
        raise
    lengths = np.minimum(size, len(plan.jobs) - np.asarray(mine, dtype=np.int64) * size)
    total = int(lengths.sum())
    done_before = int(lengths[done.complete[mine.start::mine.step]].sum()) + sum(
        1 for n in done.done if (n // size) % worker.count == worker.index)
    report = RunReport(total, done_before, 0, 0, 0, 0.0, 0.0)
    bar = progress_bar(None, progress, total=total, initial=done_before, unit="img",
                       desc=f"generate [worker {worker.index}]")
    pipeline = WritePipeline(writer, manifest, units, options.encoding, options.write_workers, bar=bar,
                             report=report, after_unit=mirror and mirror.sync)
    run = _UnitRun(sample_fn, options, writer, done, plan, run_hash, report, pipeline)
    try:
        with StopRequest() as run.stop:
            for u in mine:
                if done.complete[u]:
                    continue
                if not _run_unit(run, u):
                    break
            pipeline.drain()  # the last batch in flight (units of one batch overlap across units)
            if mirror is not None:
                mirror.sync()
            report.stopped_by = run.stop.signum
    finally:
        pipeline.close()
        if bar is not None:
            bar.close()
    report.wall_s = time.perf_counter() - t_start
    return report


UPLOAD_FIELDS = ("upload", "upload_options", "upload_retries", "upload_backoff")


def open_store(options: GenerateOptions, worker: Worker) -> ObjectStore:
    """The run's object store (``options.upload``), checked with a small write: a missing bucket, denied
    access or an unreachable store is one line before any sampling."""
    store = ObjectStore(options.upload, options=parse_upload_options(options.upload_options),
                        retries=options.upload_retries, backoff=options.upload_backoff)
    store.check(worker.part)
    return store


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
class _UnitRun:
    """What the units of one worker's run share."""

    sample_fn: SampleFn
    options: GenerateOptions
    writer: Writer
    progress: Progress
    plan: Plan
    run_hash: str
    report: RunReport
    pipeline: WritePipeline
    stop: StopRequest | None = None


def _run_unit(run: _UnitRun, u: int) -> bool:
    """Generate one unit; False if a stop was requested (the unit's finished batches are kept, except in a
    whole-unit format, where an unfinished unit is regenerated whole on resume)."""
    writer, batch_size, report, progress = run.writer, run.options.batch_size, run.report, run.progress
    pipeline = run.pipeline
    skip_done = not writer.whole_units
    pipeline.start_unit(u)  # on the writer thread, after the previous unit's file is written
    indices = progress.jobs_of(u)
    missing = 0
    for b in range(0, len(indices), batch_size):
        batch = [(n, run.plan.jobs[n]) for n in indices[b:b + batch_size]]
        if skip_done and all(progress.is_done(n) for n, _ in batch):
            continue
        items = []
        for (n, job), r in zip(batch, _run_batch([j for _, j in batch], run.sample_fn, run.options, report)):
            if skip_done and progress.is_done(n):
                continue  # the batch re-ran for the others: same bytes, nothing to rewrite
            rec = {"job_id": job.job_id, "class": job.class_name, "class_index": job.class_index,
                   "seed": job.seed, "seed_used": r.seed_used, "exemplar": job.exemplar,
                   "criterion": r.criterion, "nan": r.nan, "retries": r.retries, "config_hash": run.run_hash,
                   "file": writer.locate(u, job)["file"]}  # not file_for: the writer is on its thread
            items.append((job, None if r.nan else pipeline.encode(r.image), rec))
            report.generated += not r.nan
            report.failed += r.nan
            report.retries += r.retries
            missing += r.nan
        pipeline.submit(items)  # encoded and written while the next batch is sampled
        if run.stop.signum is not None and b + batch_size < len(indices):
            pipeline.drain()
            return False
    # the unit's file (a tar) is written, uploaded and recorded on the writer thread as the next unit samples
    pipeline.end_unit(u, missing)
    if run.stop.signum is not None:
        pipeline.drain()
        return False
    return True


def _run_batch(batch: list[Job], sample_fn: SampleFn, options: GenerateOptions,
               report: RunReport) -> list[JobResult]:
    """A ``JobResult`` per job; NaN samples retried with derived seeds."""
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
                results[j.job_id] = JobResult(img, None if nan else float(c), bool(nan), attempt,
                                              seeds[j.job_id])
        pending, attempt = retry, attempt + 1
    return [results[j.job_id] for j in batch]
