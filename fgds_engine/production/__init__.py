"""Generate a planned synthetic dataset: sharded, resumable, safe to interrupt.

The package, one job per file: ``options`` (GenerateOptions, the worker's part), ``lease`` (one live worker
per part: a kernel lock), ``store`` (output to an object store through fsspec), ``identity`` (the run's
identity and run.json), ``journal`` (manifest parts, unit records, what is done), ``pipeline`` (the
threaded write side), ``run`` (``generate_dataset``: units, retries, signals) and ``status`` (per-class
counts and the preview sheet). It consumes a sample function and imports no torch (docs/design.md).

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

from ..errors import OutputError
from ..writers import WRITERS
from .identity import (
    BYTES_VERSION,
    RUN_FILE,
    RUN_TABLES,
    config_hash,
    identity_rules,
    read_run_json,
    recorded_batch,
    run_configuration,
    run_identity,
    start_run,
)
from .journal import UNIT_RECORD, ManifestPart, Progress, UnitLog, read_units, run_key, unit_check
from .lease import PartLease, lease_path
from .options import FORMATS, GenerateOptions, Worker, unit_size
from .pipeline import WritePipeline
from .run import GeneratedBatch, JobResult, RunReport, SampleFn, StopRequest, generate_dataset, open_store
from .status import preview_sheet, status, status_table
from .store import JournalMirror, ObjectStore, StoredWriter

__all__ = ["BYTES_VERSION", "FORMATS", "RUN_FILE", "RUN_TABLES", "UNIT_RECORD", "WRITERS", "GenerateOptions",
           "GeneratedBatch", "JobResult", "ManifestPart", "OutputError", "PartLease", "Progress", "RunReport",
           "SampleFn", "StopRequest", "UnitLog", "Worker", "WritePipeline", "config_hash", "generate_dataset",
           "identity_rules", "lease_path", "open_store", "preview_sheet", "JournalMirror", "ObjectStore",
           "StoredWriter",
           "read_run_json", "read_units", "recorded_batch", "run_configuration", "run_identity", "run_key",
           "start_run", "status", "status_table", "unit_check", "unit_size"]
