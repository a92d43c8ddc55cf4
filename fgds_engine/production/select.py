"""Generate, then select (``fgds select``): keep N samples per class of an oversampled run, ranked by the
criterion its manifest recorded (the classifier named in the run), at random, or a mix of both
(docs/production.md, "Generate, then select").

The selection is a pure function of the run's records and the options: each class's finished samples are
ranked by the recorded criterion, highest first (the samples the classifier finds hardest: the filtering
family of DDB / ALIA), ties by job id; ``random`` ranks by a hash of (seed, job id), so it does not depend on
the order in which workers finished; ``mix`` keeps the ``mix`` fraction (rounded down) by criterion and fills
the rest at random from the others. A folder and its killed-and-resumed twin hold the same records, so their
selections are equal. The selection is written as an ImageFolder (links to the run's images; files taken out
of its tars for WebDataset output) with ``selection.json`` (the options, the run's identity, the kept job
ids per class); writing it again completes what a kill left, and another selection into the same folder is
one line.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..fields import check_fields, option
from ..plan import Plan, derive_seed
from ..writers import IMAGE_FORMATS, atomic_write
from .identity import RUN_FILE, read_run_json
from .journal import Progress
from .options import unit_size

BY = ("criterion", "loss", "entropy", "hardness", "random", "mix")
SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class SelectOptions:
    """How ``fgds select`` keeps samples.

    Args:
        by: "criterion" (the run's recorded criterion, highest first), its name ("loss", "entropy",
            "hardness": checked against the run), "random", or "mix".
        keep_per_class: samples kept per class; None: each class's deficit in the plan before
            ``--oversample`` (what a plan without it generates).
        mix: with ``by="mix"``, the fraction kept by criterion (the rest at random).
        seed: the seed of the random ranking.
    """

    by: str = option("criterion", "criterion (the run's, highest first) | loss | entropy | hardness | random "
                     "| mix")
    keep_per_class: int | None = option(None, "samples kept per class (default: the plan's deficit before "
                                        "--oversample)", low=0)
    mix: float = option(0.5, "with --by mix: the fraction kept by criterion, the rest at random", low=0.0,
                        high=1.0)
    seed: int = option(0, "seed of the random ranking")

    def __post_init__(self):
        check_fields(self)
        if self.by not in BY:
            raise InputError(f"--by must be one of {', '.join(BY)}, got {self.by!r}")
        if self.by != "mix" and self.mix != 0.5:
            raise InputError("--mix is for --by mix")


def finished(out: Path, plan: Plan) -> tuple[dict, dict[str, list[dict]]]:
    """(run.json, the finished samples' records per class: each job once, failures left out)."""
    if not (out / RUN_FILE).exists():
        raise InputError(f"{out} holds no run: generate it first (fgds generate {out})")
    run = read_run_json(out / RUN_FILE)
    o = run["config"]["options"]
    size = unit_size(o["format"], o["batch_size"], o.get("samples_per_shard", 256))
    Progress.load(out, plan, size, run["config_hash"])  # the journal is whole and of this plan, or one line
    per_class: dict[str, dict[str, dict]] = {c: {} for c in plan.classes}
    for part in sorted(out.glob("manifest-*.jsonl")):
        for line in part.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut by a kill
            if rec.get("config_hash") == run["config_hash"] and not rec.get("nan"):
                per_class[rec["class"]][rec["job_id"]] = rec
    return run, {c: sorted(recs.values(), key=lambda r: r["job_id"]) for c, recs in per_class.items()}


def choose(records: dict[str, list[dict]], keep: dict[str, int], options: SelectOptions) -> dict[str, list]:
    """The kept records per class (sorted by job id)."""
    chosen = {}
    for c, recs in records.items():
        n = keep[c]
        by_criterion = sorted(recs, key=lambda r: (-r["criterion"], r["job_id"]))
        at_random = sorted(recs, key=lambda r: (derive_seed(options.seed, f"select:{r['job_id']}"),
                                                r["job_id"]))
        if options.by == "random":
            kept = at_random[:n]
        elif options.by == "mix":
            top = by_criterion[:math.floor(options.mix * n)]
            ids = {r["job_id"] for r in top}
            kept = top + [r for r in at_random if r["job_id"] not in ids][:n - len(top)]
        else:
            kept = by_criterion[:n]
        chosen[c] = sorted(kept, key=lambda r: r["job_id"])
    return chosen


def select_dataset(plan: Plan, out: str | Path, to: str | Path, options: SelectOptions) -> dict[str, int]:
    """Write the selection of the run in ``out`` into the ImageFolder ``to``; returns the kept count per
    class. Bad input (a criterion the run did not record, more samples asked than a class has) is one line,
    before anything is written."""
    out, to = Path(out), Path(to)
    run, records = finished(out, plan)
    recorded = run["config"]["sampler"].get("criterion")
    if options.by in ("loss", "entropy", "hardness") and options.by != recorded:
        raise InputError(f"the run in {out} recorded the criterion {recorded!r}, not {options.by!r}: select "
                         f"--by {recorded} (or criterion), or generate with --criterion {options.by}")
    keep = (plan.keep if options.keep_per_class is None  # computed once: an allocated plan splits its budget
            else dict.fromkeys(plan.classes, options.keep_per_class))
    short = [(c, len(records[c]), keep[c]) for c in plan.classes if len(records[c]) < keep[c]]
    if short:
        c, have, want = short[0]
        raise InputError(f"class {c!r} has {have} finished sample(s) in {out}, fewer than the {want} to keep "
                         f"({len(short)} class(es) short): generate the rest first (fgds status {out}), or "
                         "keep fewer (--keep-per-class)")
    chosen = choose(records, keep, options)
    files = [r["file"] for recs in chosen.values() for r in recs]
    absent = next((f for f in files if not (out / f).is_file()), None)
    if absent is not None:
        raise InputError(f"{out / absent} is recorded but not there: fgds select reads the run's images from "
                         "its folder (a run written with --upload keeps them in its store); nothing was "
                         "written")
    o = run["config"]["options"]
    ext = IMAGE_FORMATS[o.get("image_format", "png")]
    meta = {"run": str(out.resolve()), "identity": run.get("identity", run["config_hash"]),
            "criterion": recorded, "options": asdict(options), "keep": keep,
            "kept": {c: [r["job_id"] for r in recs] for c, recs in chosen.items()}}
    existing = to / SELECTION_FILE
    if existing.exists():
        if json.loads(existing.read_text()) != meta:
            raise InputError(f"{to} holds another selection ({existing}): select into another folder, or "
                             "remove it")
    elif to.exists() and any(to.iterdir()):
        raise InputError(f"{to} is not empty and holds no selection: select into a new folder")
    to.mkdir(parents=True, exist_ok=True)
    atomic_write(existing, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    tars: dict[str, tarfile.TarFile] = {}
    try:
        for c, recs in chosen.items():
            (to / c).mkdir(exist_ok=True)
            for r in recs:
                dest = to / c / f"{r['job_id']}.{ext}"
                if dest.exists() or dest.is_symlink():
                    continue  # written before a kill
                if o["format"] == "webdataset":
                    t = tars.get(r["file"]) or tars.setdefault(r["file"], tarfile.open(out / r["file"]))
                    atomic_write(dest, t.extractfile(f"{r['job_id']}.{ext}").read())
                else:
                    tmp = dest.with_name(f".{dest.name}.tmp")
                    tmp.unlink(missing_ok=True)
                    os.symlink(os.path.relpath((out / r["file"]).resolve(), to / c), tmp)
                    os.replace(tmp, dest)
    finally:
        for t in tars.values():
            t.close()
    return {c: len(recs) for c, recs in chosen.items()}


def read_selection(to: str | Path) -> dict:
    return json.loads((Path(to) / SELECTION_FILE).read_text())
