"""One live worker per part: an exclusive lock on ``OUT/.lease-<part>`` for as long as a worker runs its part.

The lock is ``fcntl.flock`` on a file beside the part's manifest: the kernel releases it when the process
ends, however it ends (kill -9 included), so there is nothing to clean and a relaunch takes over at once. The
holder writes who it is into the file (host, pid, start time) so that a second launch of the same part is
refused in one line naming it, before it loads a model (docs/production.md, "One live worker per part"). A
run that ends removes the file (under the lock; a taker checks that the file it locked is still the one at
the path), so a finished folder holds no lease file.

What it guarantees: on a local disk, and on a shared filesystem whose ``flock`` is coherent across nodes
(NFSv4 with its server-side locks; Lustre mounted ``-o flock``), two workers never run the same part at
once. What it does not: on Lustre mounted ``-o localflock`` (or NFSv3 without lockd) the lock is only
node-local, so two nodes can both take it; there, give every array task its own ``--shard`` (parts never
collide) and never launch one index twice. An NFSv4 client that dies keeps its lock until the server's
lease expires (about 90 s), then the part can be taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import OutputError
from .options import Worker


def lease_path(out: str | Path, worker: Worker) -> Path:
    return Path(out) / f".lease-{worker.part}"


class PartLease:
    """The exclusive lock of one worker part (``acquire``); released by ``release``, by closing, or by the
    kernel when the process ends. A context manager."""

    def __init__(self, path: Path, fd: int, holder: dict):
        self.path, self.fd, self.holder = path, fd, holder

    @classmethod
    def acquire(cls, out: str | Path, worker: Worker) -> PartLease:
        """Take the part's lock, or refuse in one line naming its holder (``OutputError``)."""
        return cls._take(out, worker.part, refuse=True)

    @classmethod
    def try_part(cls, out: str | Path, part: str) -> PartLease | None:
        """The lock of part ``part`` (a name such as ``shard0of1-rank1of2``), or None while a live worker
        holds it: what another worker may write of a part only while it holds its lock."""
        return cls._take(out, part, refuse=False)

    @classmethod
    def _take(cls, out: str | Path, part: str, *, refuse: bool) -> PartLease | None:
        import fcntl

        path = Path(out) / f".lease-{part}"
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if not refuse:
                    return None
                raise OutputError(f"worker part {part} of {out} is running already: "
                                  f"{_describe(holder)}; wait for it or stop it (a part has one live worker; "
                                  "after the holder ends, a relaunch takes over at once)") from None
            except OSError as e:
                os.close(fd)
                raise OutputError(f"cannot lock {path}: {e.strerror} (a filesystem without flock: give each "
                                  "worker its own --shard; docs/production.md)") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return cls(path, fd, holder)

    def release(self) -> None:
        """Remove the file while holding the lock, then drop it (``acquire`` retries a file removed under
        it), so a finished run leaves nothing behind; a killed one leaves the file, which the next taker
        reuses."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> PartLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "held by another process (it has not written its name yet)"
    return f"held by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
