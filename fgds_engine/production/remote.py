"""Reading a run whose output is in an object store (``fgds status URL``, ``fgds train --synthetic URL``).

A local cache folder (default ``~/.cache/fgds/runs/<hash of the URL>``, or ``--cache``) holds the run's
plan.json, run.json and journal, brought up to the store's chain on every call (only the segments it lacks
are read), so ``status`` reads it as it reads a local run. ``fetch_images`` adds an ImageFolder of the run's
finished samples under ``images/`` (tars are unpacked; files already there are not read again), which
``fgds train`` reads as it reads a local synthetic folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from ..errors import InputError
from ..writers import IMAGE_FORMATS, atomic_write
from .identity import RUN_FILE, read_run_json
from .store import RUN_FILES, ObjectStore, parse_upload_options, pull_journal


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def read_location(out: str, cache: str | None, options_json: str | None, what: str
                  ) -> tuple[ObjectStore | None, str | Path]:
    """(None, out) for a local folder; (the store, its cache folder) for a URL (``fetch_run``). The store's
    flags without a URL are one line."""
    if not is_url(out):
        if options_json is not None or cache is not None:
            raise InputError(f"--store-options and --cache are for a URL as {what} (a run written with "
                             "--upload)")
        return None, out
    return fetch_run(out, cache, parse_upload_options(options_json))


def local_images(synthetic: str | None, cache: str | None, options_json: str | None, *,
                 progress: bool = False) -> str | Path | None:
    """``synthetic`` as given for a local folder (or None); for a URL, ``fetch_images``' ImageFolder."""
    if synthetic is None or not is_url(synthetic):
        read_location(synthetic or "", cache, options_json, "--synthetic")
        return synthetic
    return fetch_images(synthetic, cache, parse_upload_options(options_json), progress=progress)


def default_cache(url: str) -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "fgds" / "runs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def fetch_run(url: str, cache: str | Path | None = None, options: dict | None = None,
              store: ObjectStore | None = None) -> tuple[ObjectStore, Path]:
    """(the store, a local folder holding the run's plan.json, run.json and journal as the store has them)."""
    store = store or ObjectStore(url, options=options)
    dest = Path(cache) if cache else default_cache(url)
    dest.mkdir(parents=True, exist_ok=True)
    files = {name: store.read(name) for name in RUN_FILES}
    if files["plan.json"] is None:
        raise InputError(f"{url} holds no plan.json: not the --upload URL of a run (fgds generate OUT "
                         "--upload URL writes it)")
    if (dest / "plan.json").exists() and (dest / "plan.json").read_bytes() != files["plan.json"]:
        for p in [*dest.glob("manifest-*.jsonl"), *dest.glob("units-*.bin")]:
            p.unlink()  # a cache of another run under this URL: its journal is not this one's
        shutil.rmtree(dest / "images", ignore_errors=True)
    for name, data in files.items():
        if data is not None and (not (dest / name).exists() or (dest / name).read_bytes() != data):
            atomic_write(dest / name, data)
    pull_journal(store, dest, locked=False)  # a cache: no worker runs in it
    return store, dest


def finished_records(folder: Path) -> list[dict]:
    """The records of the finished samples of the run recorded in ``folder`` (each job once)."""
    if not (folder / RUN_FILE).exists():
        return []
    run_hash = read_run_json(folder / RUN_FILE)["config_hash"]
    found = {}
    for part in sorted(folder.glob("manifest-*.jsonl")):
        for line in part.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if rec.get("config_hash") == run_hash and not rec.get("nan"):
                found[rec["job_id"]] = rec
    return list(found.values())


def fetch_images(url: str, cache: str | Path | None = None, options: dict | None = None,
                 progress: bool = False) -> Path:
    """An ImageFolder (``<cache>/images/<class>/<job>.<ext>``) of the stored run's finished samples."""
    from ..progress_bars import progress_bar

    store, folder = fetch_run(url, cache, options)
    o = read_run_json(folder / RUN_FILE)["config"]["options"] if (folder / RUN_FILE).exists() else {}
    ext = IMAGE_FORMATS[o.get("image_format", "png")]
    images = folder / "images"
    by_file: dict[str, list[dict]] = {}
    for rec in finished_records(folder):
        if not (images / rec["class"] / f"{rec['job_id']}.{ext}").exists():
            by_file.setdefault(rec["file"], []).append(rec)
    for name, recs in progress_bar(list(by_file.items()), progress, desc="fetch", unit="file"):
        data = store.read(name)
        if data is None:
            raise InputError(f"{url}/{name} is recorded in the run's manifest but is not in the store")
        if o.get("format") == "webdataset":
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                for rec in recs:
                    member = t.extractfile(f"{rec['job_id']}.{ext}")
                    atomic_write(images / rec["class"] / f"{rec['job_id']}.{ext}", member.read())
        else:
            atomic_write(images / recs[0]["class"] / f"{recs[0]['job_id']}.{ext}", data)
    return images
