"""What a run folder holds: per-class counts (``status``) and a contact sheet of its first images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plan import Plan
from ..writers import WRITERS, Encoding, atomic_write
from .identity import RUN_FILE, read_run_json
from .journal import Progress
from .options import unit_size


def _recorded(out: Path, plan: Plan) -> tuple[dict, Progress] | None:
    """run.json's content and the run's progress, if a run was started in ``out``."""
    if not (out / RUN_FILE).exists():
        return None
    run = read_run_json(out / RUN_FILE)
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


def status_table(table: dict[str, dict[str, int]], errors: dict[str, float] | None = None) -> str:
    """``status``'s counts as the table ``fgds status`` prints: a row per class, then the totals; with
    ``errors`` (a plan of ``--allocate errors``), the classifier's error that set each class's budget."""
    w = max(12, *(len(c) for c in table))
    err = " {:>6}".format("error") if errors is not None else ""
    lines = [f"{'class':{w}}{err} {'planned':>8} {'done':>8} {'failed':>8} {'pending':>8}"]
    totals = dict.fromkeys(("planned", "done", "failed", "pending"), 0)
    for c, row in table.items():
        err = f" {errors[c]:6.3f}" if errors is not None else ""
        lines.append(f"{c:{w}}{err} {row['planned']:8d} {row['done']:8d} {row['failed']:8d} "
                     f"{row['pending']:8d}")
        for k in totals:
            totals[k] += row[k]
    pad = " " * 7 if errors is not None else ""
    lines.append(f"{'total':{w}}{pad} {totals['planned']:8d} {totals['done']:8d} {totals['failed']:8d} "
                 f"{totals['pending']:8d}")
    return "\n".join(lines)


def preview_sheet(plan: Plan, out: str | Path, path: str | Path, *, per_class: int = 8, cell: int = 64,
                  label_width: int = 180, store=None) -> tuple[int, int]:
    """A contact sheet of the run: one row per class, its first ``per_class`` generated images (scaled to
    ``cell`` pixels), labelled with the class, done / planned and failures; written atomically as PNG.
    Returns the sheet's (width, height). ``store``: the run's images are in that object store (``out`` holds
    its plan and journal: ``remote.fetch_run``)."""
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
        if store is not None:
            from .store import StoredWriter

            writer = StoredWriter(writer, store)
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
