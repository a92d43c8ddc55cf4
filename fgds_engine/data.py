"""The real, imbalanced data: an ImageFolder scan (one sub-folder of images per class) and name checks.

Every error here is an ``InputError``: the command line prints its message on one line and exits with 2.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .progress_bars import progress_bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
log = logging.getLogger(__name__)


def check_apart(**folders: str | Path | None) -> None:
    """Refuse two of the named folders that are the same or one inside the other, in one line naming both:
    an output inside the data it reads is read back as a class (the next plan, train or stats scan), data
    inside an output is mixed with what is written there."""
    given = [(name, Path(p).resolve()) for name, p in folders.items() if p is not None]
    for i, (a, pa) in enumerate(given):
        for b, pb in given[i + 1:]:
            if pa == pb:
                raise InputError(f"{a} and {b} are the same folder ({pa}): keep them apart")
            for (inner, pi), (outer, po) in (((a, pa), (b, pb)), ((b, pb), (a, pa))):
                if po in pi.parents:
                    raise InputError(f"{inner} ({pi}) is inside {outer} ({po}): keep them apart")


def safe_name(name: str, what: str) -> str:
    """``name`` if it is a single path component that stays inside its folder, else InputError."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise InputError(f"{what} {name!r} is not a plain folder or file name (it could write outside the "
                         "output folder)")
    return name


@dataclass
class ImageFolderScan:
    """Classes (sorted folder names, as torchvision's ImageFolder orders them) and their readable images."""

    root: Path
    classes: list[str]
    files: dict[str, list[str]]  # class -> sorted file names of readable images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def counts(self) -> dict[str, int]:
        return {c: len(self.files[c]) for c in self.classes}


def image_files(folder: Path) -> list[str]:
    """Sorted names of the image files (by extension) directly in ``folder``; [] if it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _readable(path: Path) -> str | None:
    """None if PIL can decode the image, else the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image we can use"
        return f"{type(e).__name__}: {e}".splitlines()[0]


def scan_imagefolder(root: str | Path, *, verify: bool = True, progress: bool = False) -> ImageFolderScan:
    """Scan ``root``: its sub-folders are the classes, their image files (by extension) the samples.

    With ``verify`` every image is decoded once; unreadable ones are skipped and listed (a warning, not a
    crash). A missing or empty root, or a class folder without a readable image, is an InputError.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"data folder {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"no class folders in {root}: expected one sub-folder of images per class")
    for c in classes:
        safe_name(c, "class folder")
    candidates = {c: image_files(root / c) for c in classes}
    files, skipped = {}, []
    items = [(c, f) for c in classes for f in candidates[c]]
    items = progress_bar(items, verify and progress, desc="checking images", unit="img")
    bad = set()
    if verify:
        for c, f in items:
            reason = _readable(root / c / f)
            if reason:
                bad.add((c, f))
                skipped.append((f"{c}/{f}", reason))
    for c in classes:
        files[c] = [f for f in candidates[c] if (c, f) not in bad]
        if not files[c]:
            what = "no readable images" if candidates[c] else f"no images ({'/'.join(IMAGE_EXTENSIONS)})"
            raise InputError(f"class folder {c!r} in {root} has {what}")
    for path, reason in skipped:
        log.warning("skipped unreadable image %s (%s)", path, reason)
    return ImageFolderScan(root, classes, files, skipped)


def load_class_names(path: str | Path, classes: list[str]) -> dict[str, str]:
    """Prompt names per class folder from a JSON object {folder: name} or a text file of "folder name" lines.

    Every folder must be a class of the data; names may not contain path separators.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"class-name map {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        names = json.loads(text) if p.suffix == ".json" else dict(
            line.split(maxsplit=1) for line in text.splitlines() if line.strip())
    except (json.JSONDecodeError, ValueError) as e:
        raise InputError(f"class-name map {p} is not a JSON object or 'folder name' lines: {e}") from None
    if not isinstance(names, dict):
        raise InputError(f"class-name map {p} must map class folders to names")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise InputError(f"class-name map {p} names folders that are not classes of the data: {unknown[:5]}")
    for k, v in names.items():
        safe_name(k, "class folder in the name map")
        safe_name(str(v), "class name in the name map")
    return {c: str(names.get(c, c)) for c in classes}
