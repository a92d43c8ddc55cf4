"""Writers of the synthetic dataset: an ImageFolder and WebDataset tars behind one interface.

A writer is told which unit of work it is in (``start_unit``), takes one sample at a time (``write``: the
encoded image and its manifest record; a failed sample has no image), and says which records are final and may
go to the manifest: after every batch for an ImageFolder (each image is renamed into place as it comes),
after the unit for WebDataset (the records follow the tar's rename). ``has(record)`` tells a resumed run
whether a recorded sample's image is really there. Every file goes through ``atomic_write``: a temp name,
then a rename, so nothing half-written is ever under its final name. ``Encoding`` turns pixels into PNG,
JPEG or WebP bytes (the same pixels give the same bytes); production.py runs it off the sampling thread.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .data import safe_name
from .errors import OutputError


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None], tag: str = "") -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temp name beside ``path`` (``tag``
    tells workers' temps apart), then rename it into place; OutputError if the folder refuses."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tag}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


IMAGE_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # format -> file extension


@dataclass(frozen=True)
class Encoding:
    """How images are stored: PNG (lossless, ``png_level`` 0-9) or JPEG / WebP at ``quality`` 1-100. Fixed
    settings: the same pixels give the same bytes. PIL releases the GIL while it encodes, so threads encode
    in parallel with each other and with the sampler."""

    format: str = "png"
    quality: int = 95
    png_level: int = 6

    @property
    def ext(self) -> str:
        return IMAGE_FORMATS[self.format]

    def encode(self, image: np.ndarray) -> bytes:
        """The bytes of an HxWx3 uint8 image."""
        from PIL import Image

        buf = io.BytesIO()
        im = Image.fromarray(image)
        if self.format == "png":
            im.save(buf, format="PNG", compress_level=self.png_level)
        elif self.format == "jpeg":
            im.save(buf, format="JPEG", quality=self.quality)
        else:
            im.save(buf, format="WEBP", quality=self.quality, method=4)
        return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an HxWx3 uint8 image at the default level."""
    return Encoding().encode(image)


class Writer:
    """The interface (and the bookkeeping of the records not yet final)."""

    whole_units = False  # True: a unit is one file, rewritten whole if a run stopped inside it

    def __init__(self, out: str | Path, tag: str = "", encoding: Encoding = Encoding()):
        self.out, self.tag, self.encoding, self._records = Path(out), tag, encoding, []

    def start_unit(self, unit: int) -> None:
        """A new unit of work begins."""

    def file_for(self, job) -> str:
        """The manifest's "file" of ``job``: where its image is, relative to the output folder."""
        raise NotImplementedError

    def write(self, job, data: bytes | None, record: dict) -> None:
        """One sample: its encoded image (None for a sample that failed) and its manifest record."""
        self._records.append(record)
        if data is not None:
            self._store(job, data, record)

    def end_batch(self) -> list[dict]:
        """The records that are final after a batch."""
        return [] if self.whole_units else self._take()

    def end_unit(self) -> list[dict]:
        """Flush the unit; the records now final."""
        return self._take()

    def has(self, record: dict) -> bool:
        """Whether the image that ``record`` names is there and readable."""
        raise NotImplementedError

    def locate(self, unit: int, job) -> dict:
        """Where the image of ``job`` of work unit ``unit`` is: ``{"job_id", "file"}``, as a record names it
        (for ``has`` / ``read`` without the record)."""
        return {"job_id": job.job_id, "file": self.file_for(job)}

    def read(self, record: dict) -> bytes | None:
        """The encoded bytes of a written sample (None if it is not there)."""
        raise NotImplementedError

    def _store(self, job, data: bytes, record: dict) -> None:
        raise NotImplementedError

    def _take(self) -> list[dict]:
        out, self._records = self._records, []
        return out


class ImageFolderWriter(Writer):
    """OUT/<class>/<job id>.<png|jpg|webp>, the layout torchvision's ImageFolder reads."""

    def file_for(self, job) -> str:
        name = f"{safe_name(job.job_id, 'job id')}.{self.encoding.ext}"
        return f"{safe_name(job.class_name, 'class name')}/{name}"

    def _store(self, job, data: bytes, record: dict) -> None:
        atomic_write(self.out / self.file_for(job), data, self.tag)

    def read(self, record: dict) -> bytes | None:
        path = self.out / record["file"]
        return path.read_bytes() if path.is_file() else None

    def has(self, record: dict) -> bool:
        from PIL import Image

        try:
            with Image.open(self.out / record["file"]) as im:
                im.verify()
            return True
        except Exception:  # noqa: BLE001 - missing or damaged: regenerate
            return False


class WebDatasetWriter(Writer):
    """OUT/shard-<unit>.tar per unit: <job id>.<png|jpg|webp>, .cls (the class index) and .json (the record),
    mtime 0 (the same samples give the same tar bytes); webdataset's decoders pick the format by extension."""

    whole_units = True

    def __init__(self, out: str | Path, tag: str = "", encoding: Encoding = Encoding()):
        super().__init__(out, tag, encoding)
        self.tar_name, self._samples, self._members = None, [], {}

    def start_unit(self, unit: int) -> None:
        self.tar_name, self._samples = f"shard-{unit:06d}.tar", []
        self._members.pop(self.out / self.tar_name, None)  # rewritten: its members are read again

    def file_for(self, job) -> str:
        return self.tar_name

    def locate(self, unit: int, job) -> dict:
        return {"job_id": job.job_id, "file": f"shard-{unit:06d}.tar"}

    def _store(self, job, data: bytes, record: dict) -> None:
        self._samples.append((job, data, record))

    def end_unit(self) -> list[dict]:
        import webdataset as wds

        def write_tar(f):
            w = wds.TarWriter(f, mtime=0, user="fgds", group="fgds", encoder=False)
            for job, data, rec in self._samples:
                w.write({"__key__": job.job_id, self.encoding.ext: data, "cls": str(job.class_index).encode(),
                         "json": json.dumps(rec, sort_keys=True).encode()})
            w.close()

        atomic_write(self.out / self.tar_name, write_tar, self.tag)
        self._samples = []
        return self._take()

    def read(self, record: dict) -> bytes | None:
        try:
            with tarfile.open(self.out / record["file"]) as t:
                member = t.extractfile(f"{record['job_id']}.{self.encoding.ext}")
                return None if member is None else member.read()
        except (OSError, tarfile.TarError, KeyError):
            return None

    def has(self, record: dict) -> bool:
        path = self.out / record["file"]
        if path not in self._members:
            try:
                with tarfile.open(path) as t:
                    self._members[path] = set(t.getnames())
            except (OSError, tarfile.TarError):
                self._members[path] = set()
        return f"{record['job_id']}.{self.encoding.ext}" in self._members[path]


WRITERS = {"imagefolder": ImageFolderWriter, "webdataset": WebDatasetWriter}
