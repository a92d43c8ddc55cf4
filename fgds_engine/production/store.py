"""Output to an object store through fsspec (``fgds generate OUT --upload URL``): OUT is the local staging
folder, URL the run's durable home (docs/production.md, "Output to an object store").

What goes where, in this order:

- An image file (ImageFolder: one per job; WebDataset: the unit's tar) is written to staging, uploaded whole
  and deleted from staging once the store confirmed it; only then are its records appended to the local
  manifest part. An object store shows an object only once its upload completed, so a kill mid-upload leaves
  nothing visible, and the staging folder holds at most the files of the batches in flight.
- The journal is mirrored per unit: the bytes appended to the worker's manifest part and unit records since
  the last mirror go up as one *segment* object, ``journal/<part>/<m0>+<m_len>.<u0>+<u_len>.seg``; the chain
  of a part's segments from offset 0 rebuilds the part on a node whose disk is empty. A kill between a unit
  record and its segment leaves the local journal ahead: the next start on that node uploads the rest; a
  fresh node runs that unit again (the same bytes to the same object).
- plan.json and run.json go up at the start; a node that lacks them takes them from the store.

Every store call is retried ``retries`` times, the wait doubling from ``backoff`` seconds (at most 30 s);
then the run stops with one line and resumes from what the store last confirmed. A missing bucket and denied
access are not retried: one line, before a model loads. Credentials come only from the fsspec backend's
standard environment (for S3: the AWS_* variables, ~/.aws, an instance role): ``--upload-options`` refuses
credential keys and a URL with user info is refused, so neither can reach a log or run.json.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

from ..errors import InputError, OutputError
from ..writers import Writer, atomic_write
from .journal import UNIT_RECORD, cut_partial
from .lease import PartLease

CREDENTIAL_KEYS = {"key", "secret", "token", "password", "username", "account_key", "sas_token",
                   "client_secret", "connection_string", "credentials", "aws_access_key_id",
                   "aws_secret_access_key", "aws_session_token"}
MAX_WAIT = 30.0  # seconds: the longest wait between two tries
_SEGMENT = re.compile(r"(\d{14})\+(\d+)\.(\d{12})\+(\d+)\.seg")
RUN_FILES = ("plan.json", "run.json")


def parse_upload_options(text: str | None) -> dict:
    """The JSON object of ``--upload-options`` (the backend's own arguments, e.g. ``endpoint_url``); one line
    for bad JSON or a credential key anywhere in it."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--upload-options is not a JSON object: {e}") from None
    if not isinstance(options, dict):
        raise InputError("--upload-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    found = sorted(_credential_keys(options))
    if found:
        raise InputError(f"--upload-options may not hold credentials ({', '.join(found)}): give them "
                         "through the backend's standard environment (for S3: AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role), never logged or recorded")
    return options


def _credential_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return {k for k in obj if k.lower() in CREDENTIAL_KEYS} | {
            k for v in obj.values() for k in _credential_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _credential_keys(v)}
    return set()


class ObjectStore:
    """A run's folder in an object store: whole-object puts, reads and listings, each retried with backoff.

    ``url``: any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://`` ...); ``options``:
    the backend's arguments (no credentials); ``retries`` / ``backoff``: tries after the first, and the first
    wait in seconds (doubling, at most ``MAX_WAIT``)."""

    def __init__(self, url: str, *, options: dict | None = None, retries: int = 5, backoff: float = 1.0,
                 sleep=time.sleep):
        import fsspec

        if "://" not in url:
            raise InputError(f"--upload {url}: not a URL (s3://bucket/prefix, gs://..., az://...)")
        scheme, rest = url.split("://", 1)
        if "@" in rest.split("/", 1)[0]:
            raise InputError(f"--upload {scheme}://...: the URL holds user info (credentials?); give them "
                             "through the backend's standard environment instead")
        try:
            self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(options or {}))
        except ImportError as e:
            raise InputError(f"--upload {url}: {e} (install the fsspec backend of {scheme}://, e.g. s3fs "
                             "for s3://)") from None
        except (ValueError, TypeError) as e:
            raise InputError(f"--upload {url}: {e}") from None
        self.url, self.root = url.rstrip("/"), root.rstrip("/")
        self.retries, self.backoff, self.sleep = retries, backoff, sleep

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def call(self, what: str, fn, *args):
        """``fn(*args)`` with the store's retries; ``what`` names the call in the one line that ends them."""
        wait = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except PermissionError as e:
                raise OutputError(f"{what} {self.url}: access denied ({_short(e)}); check the credentials in "
                                  "the backend's environment and the bucket's policy") from None
            except FileNotFoundError as e:
                raise OutputError(f"{what} {self.url}: {_short(e)} (the bucket must exist: the engine "
                                  "never creates one)") from None
            except Exception as e:  # noqa: BLE001 - a connection, a timeout, a 5xx: try again
                if attempt == self.retries:
                    raise OutputError(
                        f"{what} {self.url} failed {attempt + 1} time(s), the last: {_short(e)}; the store "
                        "is unreachable or refusing: what it confirmed is recorded, resume with the same "
                        "command once it is back") from None
                self.sleep(min(wait, MAX_WAIT))
                wait *= 2

    def check(self, part: str) -> None:
        """A small object written and removed: a missing bucket, denied access or an unreachable store is
        one line here, before a model loads."""
        probe = self.path(f".write-test-{part}")
        self.call("writing to", self.fs.pipe_file, probe, b"")
        self.call("writing to", self.fs.rm_file, probe)

    def put_files(self, local: list[Path], rel: list[str]) -> None:
        """Upload whole files (concurrently where the backend can); each object appears complete or not at
        all."""
        if local:
            self.call("uploading to", self.fs.put, [str(p) for p in local], [self.path(r) for r in rel])

    def put_bytes(self, data: bytes, rel: str) -> None:
        self.call("uploading to", self.fs.pipe_file, self.path(rel), data)

    def read(self, rel: str) -> bytes | None:
        """An object's bytes, None if there is none."""
        def cat():
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError:
                return None
        return self.call("reading from", cat)

    def exists(self, rel: str) -> bool:
        return bool(self.call("reading from", self.fs.exists, self.path(rel)))

    def list(self, prefix: str) -> list[str]:
        """The objects under ``prefix`` (relative names), listed afresh."""
        def find():
            self.fs.invalidate_cache()
            try:
                return self.fs.find(self.path(prefix))
            except FileNotFoundError:
                return []
        return sorted(p[len(self.root) + 1:] for p in self.call("listing", find))


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------- run files

def pull_run_files(store: ObjectStore, out: Path, tag: str = "") -> None:
    """plan.json and run.json from the store into a staging folder that lacks them (a fresh node; ``tag``: the
    worker's, so that the ranks of a node write their own temp files); a local plan that differs from the
    store's is one line (two runs in one place)."""
    for name in RUN_FILES:
        remote, local = store.read(name), out / name
        if remote is None:
            continue
        if not local.exists():
            atomic_write(local, remote, tag)
        elif name == "plan.json" and local.read_bytes() != remote:
            raise InputError(f"{local} differs from {store.url}/{name}: the staging folder and the store "
                             "hold different plans; stage in an empty folder, or upload to another prefix")


def push_run_files(store: ObjectStore, out: Path) -> None:
    """plan.json and run.json to the store when it lacks them or holds other bytes."""
    for name in RUN_FILES:
        data = (out / name).read_bytes()
        if store.read(name) != data:
            store.put_bytes(data, name)


# ---------------------------------------------------------------------------------------------- the journal

def segment_name(part: str, m0: int, m_len: int, u0: int, u_len: int) -> str:
    return f"journal/{part}/{m0:014d}+{m_len}.{u0:012d}+{u_len}.seg"


def remote_chains(store: ObjectStore) -> dict[str, list[tuple[int, int, int, int, str]]]:
    """Per part: its segments that chain from offset 0, as (m0, m_len, u0, u_len, name); a segment after a
    gap is left out (its predecessor never landed: that worker's next start uploads it again)."""
    found: dict[str, list] = {}
    for rel in store.list("journal"):
        _, part, name = rel.split("/", 2) if rel.count("/") == 2 else (None, None, None)
        m = _SEGMENT.fullmatch(name or "")
        if m:
            m0, lm, u0, lu = map(int, m.groups())
            found.setdefault(part, []).append((m0, lm, u0, lu, rel))
    chains = {}
    for part, segs in found.items():
        chain, m, u = [], 0, 0
        for seg in sorted(segs):
            if (seg[0], seg[2]) == (m, u):
                chain.append(seg)
                m, u = m + seg[1], u + seg[3]
        chains[part] = chain
    return chains


def chain_end(chain) -> tuple[int, int]:
    return (chain[-1][0] + chain[-1][1], chain[-1][2] + chain[-1][3]) if chain else (0, 0)


def pull_journal(store: ObjectStore, out: Path, own: str | None = None, *, tag: str = "",
                 locked: bool = True) -> dict[str, tuple[int, int]]:
    """Bring every part's journal in staging up to the store's chain (parts another node ran further, or a
    fresh node's empty folder). A local part ahead of the store (a kill before its mirror) is kept. The caller
    holds ``own`` part's lease; another part is written only under its lease (``locked``: a cache folder that
    no worker runs in needs none), so a worker of this node that runs it is never written under. Returns
    the chain's end per part, where the mirror of ``own`` continues."""
    ends = {}
    for part, chain in remote_chains(store).items():
        ends[part] = chain_end(chain)
        if part == own or not locked:
            _pull_part(store, out, part, chain, tag)
            continue
        lease = PartLease.try_part(out, part)
        if lease is None:
            continue  # live on this node: its own worker brings it up to the store
        with lease:
            _pull_part(store, out, part, chain, tag)
    return ends


def _pull_part(store: ObjectStore, out: Path, part: str, chain, tag: str) -> None:
    manifest, units = out / f"manifest-{part}.jsonl", out / f"units-{part}.bin"
    here = (cut_partial(manifest, 1), cut_partial(units, UNIT_RECORD.itemsize))
    if here[0] >= chain_end(chain)[0]:
        return  # as far as the store, or further (not mirrored yet): the local journal is right
    start = next((i for i, s in enumerate(chain) if (s[0], s[2]) == here), None)
    if start is None:  # not at a segment boundary: not a prefix of the store's chain; take the chain
        start, here = 0, (0, 0)
    m_data, u_data = _read_segments(store, chain[start:])
    for path, data, keep in ((manifest, m_data, here[0]), (units, u_data, here[1])):
        old = path.read_bytes()[:keep] if keep else b""
        atomic_write(path, old + data, tag)


def _read_segments(store: ObjectStore, segs) -> tuple[bytes, bytes]:
    m_data, u_data = [], []
    for _, lm, _, lu, rel in segs:
        data = store.read(rel)
        if data is None or len(data) != lm + lu:
            raise InputError(f"{store.url}/{rel} is missing or of the wrong size; nothing was changed")
        m_data.append(data[:lm])
        u_data.append(data[lm:])
    return b"".join(m_data), b"".join(u_data)


class JournalMirror:
    """Uploads what one worker appended to its manifest part and unit records since the last mirror, as one
    segment; ``sync`` runs after every unit record (on the writer thread) and at the end of the run."""

    def __init__(self, store: ObjectStore, out: Path, part: str, start: tuple[int, int] = (0, 0)):
        self.store, self.part = store, part
        self.manifest, self.units = out / f"manifest-{part}.jsonl", out / f"units-{part}.bin"
        self.m, self.u = start

    def sync(self) -> None:
        m_data, u_data = _tail(self.manifest, self.m), _tail(self.units, self.u)
        if m_data or u_data:
            self.store.put_bytes(m_data + u_data,
                                 segment_name(self.part, self.m, len(m_data), self.u, len(u_data)))
            self.m, self.u = self.m + len(m_data), self.u + len(u_data)


def _tail(path: Path, start: int) -> bytes:
    if not path.exists():
        return b""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read()


# ---------------------------------------------------------------------------------------------- the writer

class StoredWriter(Writer):
    """A writer whose files go to the store: the wrapped writer writes them to staging; every file its final
    records name is uploaded, then removed from staging, before those records are returned (and so before
    the manifest holds them). ``has`` and ``read`` ask the store."""

    def __init__(self, inner: Writer, store: ObjectStore):
        super().__init__(inner.out, inner.tag, inner.encoding)
        self.inner, self.store, self.whole_units = inner, store, inner.whole_units
        self._present: dict[str, bool] = {}

    def start_unit(self, unit: int) -> None:
        self.inner.start_unit(unit)

    def file_for(self, job) -> str:
        return self.inner.file_for(job)

    def locate(self, unit: int, job) -> dict:
        return self.inner.locate(unit, job)

    def write(self, job, data: bytes | None, record: dict) -> None:
        self.inner.write(job, data, record)

    def end_batch(self) -> list[dict]:
        return self._upload(self.inner.end_batch())

    def end_unit(self) -> list[dict]:
        return self._upload(self.inner.end_unit())

    def _upload(self, records: list[dict]) -> list[dict]:
        names = [f for f in dict.fromkeys(r["file"] for r in records) if (self.out / f).exists()]
        self.store.put_files([self.out / f for f in names], names)
        for f in names:
            (self.out / f).unlink()
            self._present[f] = True
        return records

    def has(self, record: dict) -> bool:
        f = record["file"]
        if f not in self._present:
            self._present[f] = self.store.exists(f)
        return self._present[f]

    def read(self, record: dict) -> bytes | None:
        data = self.store.read(record["file"])
        if data is None or not self.whole_units:
            return data
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                member = t.extractfile(f"{record['job_id']}.{self.encoding.ext}")
                return None if member is None else member.read()
        except (tarfile.TarError, KeyError):
            return None
