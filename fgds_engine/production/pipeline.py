"""The write side of a worker's run, overlapped with sampling.

While the sampler produces batch k+1, a pool of ``write_workers`` threads encodes batch k (PNG / JPEG / WebP:
PIL releases the GIL) and one writer thread, in batch order, writes its files and then appends its records.
The sampling thread only waits when two batches are in flight (memory stays flat); a stop drains them; an
encoding or writing error surfaces in the sampling thread, and no later batch is written or recorded after
it. With ``write_workers=0`` everything runs inline, in the same order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..writers import Encoding, Writer
from .journal import ManifestPart, UnitLog


def _done(value) -> Future:
    """``value`` as a finished future (the inline path: the loop is the same either way)."""
    f = Future()
    f.set_result(value)
    return f


class WritePipeline:
    """Encode, write and record the batches of one worker's run, in order.

    ``encode(image)``: a future of its bytes; ``start_unit(u)``: the writer enters unit u; ``submit(items)``:
    a sampled batch ``[(job, bytes future or None, record)]`` to write (waits while two are in flight);
    ``end_unit(u, missing)``: after the unit's batches, its final records and its unit record; ``drain()``:
    wait until everything submitted is written (the first error is raised here); ``close()``: stop the
    threads and close the journal files.
    ``after_unit``: called on the writer thread after each unit record (the object store's journal mirror).
    """

    def __init__(self, writer: Writer, manifest: ManifestPart, units: UnitLog, encoding: Encoding,
                 workers: int, *, bar=None, report=None, after_unit=None):
        self.writer, self.manifest, self.units, self.encoding = writer, manifest, units, encoding
        self.bar, self.report, self.after_unit = bar, report, after_unit
        self.unit_start = manifest.size  # where the next unit's records begin in the part (writer thread's)
        self.failed = False
        self.in_flight: deque[Future] = deque()  # futures of the batches sampled, not yet written
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self.store = ThreadPoolExecutor(1) if workers else None  # one thread: batches stay in order

    def _on_writer(self, fn, *args) -> Future:
        return _done(fn(*args)) if self.store is None else self.store.submit(fn, *args)

    def encode(self, image: np.ndarray) -> Future:
        if self.pool is None:
            return _done(self.encoding.encode(image))
        return self.pool.submit(self.encoding.encode, image)

    def submit(self, items: list) -> None:
        self.in_flight.append(self._on_writer(self._write_batch, items))
        while len(self.in_flight) > 1:
            self.in_flight.popleft().result()

    def start_unit(self, u: int) -> None:
        """The writer enters unit ``u`` on its thread, after the previous unit's ``end_unit`` (which reads
        the writer's state of that unit): the sampler goes on while a unit's file is written."""
        self.in_flight.append(self._on_writer(self.writer.start_unit, u))

    def end_unit(self, u: int, missing: int) -> None:
        # on the writer's thread, after the unit's batches: the writer is never touched from two threads (an
        # end_unit on the sampling thread used to take the records of a batch the writer was still writing)
        self.in_flight.append(self._on_writer(self._end_unit, u, missing))

    def drain(self) -> None:
        while self.in_flight:
            self.in_flight.popleft().result()

    def close(self) -> None:
        for ex in (self.store, self.pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        self.manifest.close()
        self.units.close()

    def _write_batch(self, items: list) -> None:
        """One batch: its encoded images to the writer in order, then its final records (on the writer
        thread; after a failure, later batches are neither written nor recorded)."""
        if self.failed:
            return
        try:
            for job, encoded, rec in items:
                self.writer.write(job, None if encoded is None else encoded.result(), rec)
            self.manifest.append(self.writer.end_batch())
        except BaseException:
            self.failed = True
            raise
        if self.bar is not None:
            self.bar.update(len(items))
            self.bar.set_postfix(retries=self.report.retries, failed=self.report.failed)

    def _end_unit(self, u: int, missing: int) -> None:
        """Flush the unit, record what is final, then its unit record (nothing after a failed batch)."""
        if self.failed:
            return
        try:
            self.manifest.append(self.writer.end_unit())
            self.units.append([(u, self.unit_start, self.manifest.size, missing)])
            if self.after_unit is not None:  # e.g. the journal's mirror in the object store
                self.after_unit()
        except BaseException:
            self.failed = True
            raise
        self.unit_start = self.manifest.size
