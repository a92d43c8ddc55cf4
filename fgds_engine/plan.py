"""Plan a synthetic dataset: per-class deficits to a uniform target, and the job list that fills them.

A job is (job id, class, class index, seed, exemplar, prompt). Job n of the plan is the k-th of its class c
(classes in ImageFolder order, each class's deficit in turn): id ``f"{c:05d}_{k:06d}"``, its seed and its
exemplar pure functions of the run seed and the id (SHA-256), its prompt the template with the class's name.
So a plan is its table, not its jobs: ``plan.json`` holds the classes, their deficits, names and real files
(the exemplars' table) and the options, whatever the number of jobs (10 M jobs of 1,000 classes: the size of
the file list), and ``plan.jobs`` computes a job when it is asked for (``JobTable``: two SHA-256 per job),
so a worker holds only the jobs of the batch it runs. A job's image does not depend on which process, shard or
batch runs it.

A plan written before this layout (``jobs.jsonl``: one JSON line per job) is read as a list, as it was; so is
a plan whose jobs were chosen in code (the demo's budget cap), which ``write_plan`` writes that way.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .config import check_fields, option
from .data import ImageFolderScan, safe_name
from .errors import InputError
from .writers import atomic_write

PLAN_FILE, JOBS_FILE = "plan.json", "jobs.jsonl"
PLAN_FORMAT = 2  # 1 (no "format" key): plan.json + jobs.jsonl


def derive_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and a key (SHA-256: stable across machines and Python versions)."""
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class PlanOptions:
    """How deficits and jobs are computed.

    Args:
        target: images per class after filling (real + synthetic); None: the largest class's count.
        min_per_class: synthetic images per class at least (1, as the demo code generates for every class).
        run_seed: the seed every job seed and exemplar choice derives from.
        prompt_template: text prompt, ``{name}`` replaced by the class name.
        oversample: K: each class gets ceil(K x its deficit) jobs, the first ones the jobs of the plan without
            it; ``fgds select`` keeps the deficit (``Plan.keep``) of them (generate, then select).
        allocate: "errors": the uniform plan's total budget split by the classifier's per-class error on
            ``val`` (``split_budget``: ``allocate_floor`` per class, the rest in proportion to error **
            ``allocate_power``); None: the uniform deficits.
    """

    target: int | None = option(None, "images per class after filling (default: the largest class)", low=1)
    min_per_class: int = option(1, "synthetic images per class at least", low=0)
    run_seed: int = option(0, "seed of every job seed and exemplar")
    prompt_template: str = option("a photo of a {name}", "prompt, {name} = class name")
    oversample: float = option(1.0, "K: generate ceil(K x deficit) per class, the first deficit of them the "
                               "jobs of the plan without it; fgds select keeps the deficit", low=1.0,
                               high=1000.0, neutral=1.0)
    allocate: str | None = option(None, "errors: split the uniform plan's total budget by the classifier's "
                                  "per-class error on --val (needs --classifier)", neutral=None)
    val: str | None = option(None, "with --allocate errors: a validation ImageFolder of the same classes "
                             "(never the test set)", inert_unless="allocate")
    allocate_floor: int = option(1, "with --allocate: images per class at least", low=0,
                                 inert_unless="allocate")
    allocate_power: float = option(1.0, "with --allocate: each class's share of the rest is proportional to "
                                   "its error ** power (0: uniform)", low=0.0, high=10.0,
                                   inert_unless="allocate")

    def __post_init__(self):
        check_fields(self)
        if self.allocate not in (None, "errors"):
            raise InputError(f"allocate must be 'errors' (or not given), got {self.allocate!r}")
        if self.allocate is None and (self.val is not None or self.allocate_floor != 1
                                      or self.allocate_power != 1.0):
            raise InputError("--val, --allocate-floor and --allocate-power are for --allocate errors")
        if self.allocate and self.val is None:
            raise InputError("--allocate errors needs --val VAL: a validation ImageFolder of the same "
                             "classes (never the test set), where the classifier's errors are measured")
        if "{name}" not in self.prompt_template:
            raise InputError(f"prompt_template must contain {{name}}, got {self.prompt_template!r}")


@dataclass(frozen=True)
class Job:
    job_id: str
    class_name: str
    class_index: int
    seed: int
    exemplar: str  # path of a real image of the class, relative to the data root
    prompt: str

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        """A job read back from jobs.jsonl, its names checked (they become output paths)."""
        job = cls(**{k: d[k] for k in ("job_id", "class_name", "class_index", "seed", "exemplar", "prompt")})
        safe_name(job.job_id, "job id")
        safe_name(job.class_name, "class name")
        return job


def job_id(class_index: int, k: int) -> str:
    return f"{class_index:05d}_{k:06d}"


class JobTable(Sequence):
    """The jobs of a plan, computed from its table on demand: ``len``, ``[n]``, ``[a:b]``, ``index(job_id)``.

    Nothing of size N is held: the class offsets (one integer per class), the classes' file lists (the
    exemplars) and names.
    """

    def __init__(self, classes: list[str], deficit: dict[str, int], files: dict[str, list[str]],
                 names: dict[str, str], run_seed: int, prompt_template: str):
        self.classes, self.files, self.run_seed = classes, files, run_seed
        self.prompts = [prompt_template.format(name=names[c]) for c in classes]
        self.offsets = [0]
        for c in classes:
            self.offsets.append(self.offsets[-1] + deficit[c])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self.job(i) for i in range(*n.indices(len(self)))]
        if n < 0:
            n += len(self)
        if not 0 <= n < len(self):
            raise IndexError(f"job {n} of a plan of {len(self)}")
        return self.job(n)

    def __iter__(self):
        return (self.job(n) for n in range(len(self)))

    def __eq__(self, other) -> bool:
        return (isinstance(other, Sequence) and len(self) == len(other)
                and all(a == b for a, b in zip(self, other)))

    def job(self, n: int) -> Job:
        c = bisect.bisect_right(self.offsets, n) - 1
        name, jid = self.classes[c], job_id(c, n - self.offsets[c])
        files = self.files[name]
        exemplar = files[derive_seed(self.run_seed, f"exemplar:{jid}") % len(files)]
        return Job(jid, name, c, derive_seed(self.run_seed, jid), f"{name}/{exemplar}", self.prompts[c])

    def index(self, jid: str, *_) -> int:
        """The position of job id ``jid`` (ValueError if the plan has no such job)."""
        try:
            c, k = (int(v) for v in jid.split("_"))
        except ValueError:
            raise ValueError(f"{jid!r} is not a job id of this plan") from None
        if not (0 <= c < len(self.classes) and 0 <= k < self.offsets[c + 1] - self.offsets[c]
                and jid == job_id(c, k)):
            raise ValueError(f"{jid!r} is not a job id of this plan")
        return self.offsets[c] + k

    def class_array(self) -> np.ndarray:
        """The class index of every job (int32; for status, not for a worker)."""
        return np.repeat(np.arange(len(self.classes), dtype=np.int32), np.diff(self.offsets))


@dataclass
class Plan:
    data_root: str
    classes: list[str]
    real: dict[str, int]
    deficit: dict[str, int]
    options: PlanOptions
    jobs: Sequence[Job]  # a JobTable, or a list (a plan of format 1, or jobs chosen in code)
    files: dict[str, list[str]] | None = None  # the exemplars' table (a JobTable's)
    names: dict[str, str] | None = None  # prompt names (a JobTable's)
    errors: dict[str, float] | None = None  # --allocate errors: the classifier's error per class on --val

    @property
    def target(self) -> int:
        return self.options.target or max(self.real.values())

    @property
    def keep(self) -> dict[str, int]:
        """Per class: the budget without ``--oversample`` (what ``fgds select`` keeps by default): the
        deficit to the target, or its total split by the classifier's errors (``--allocate errors``)."""
        keep = {c: max(self.target - self.real[c], self.options.min_per_class) for c in self.classes}
        if self.errors is None:
            return keep
        o = self.options
        return split_budget(sum(keep.values()), self.errors, o.allocate_floor, o.allocate_power)

    @property
    def is_table(self) -> bool:
        return isinstance(self.jobs, JobTable)

    def table(self) -> str:
        """Per-class table (real, synthetic, total) and the totals."""
        w = max(12, *(len(c) for c in self.classes))
        over = self.options.oversample != 1.0  # then: how many a selection keeps, and the total after it
        keep = self.keep
        after = keep if over else self.deficit
        extra = " {:>8}".format("keep") if over else ""
        err = " {:>6}".format("error") if self.errors is not None else ""
        lines = [f"{'class':{w}} {'index':>5}{err} {'real':>8} {'synthetic':>10}{extra} {'total':>8}"]
        for i, c in enumerate(self.classes):
            extra = f" {keep[c]:8d}" if over else ""
            err = f" {self.errors[c]:6.3f}" if self.errors is not None else ""
            lines.append(f"{c:{w}} {i:5d}{err} {self.real[c]:8d} {self.deficit[c]:10d}{extra} "
                         f"{self.real[c] + after[c]:8d}")
        real, syn, kept = sum(self.real.values()), sum(self.deficit.values()), sum(after.values())
        extra = f" {kept:8d}" if over else ""
        err = " " * 7 if self.errors is not None else ""
        lines.append(f"{'total':{w}} {len(self.classes):5d}{err} {real:8d} {syn:10d}{extra} {real + kept:8d}")
        return "\n".join(lines)

    def _content(self) -> dict:
        """What plan.json holds and its digest covers; an option at its neutral value (or one inert beside
        it) is left out, so a plan from before the option existed keeps its digest."""
        options = _recorded_options(self.options)
        content = {"format": PLAN_FORMAT, "classes": self.classes, "deficit": self.deficit,
                   "files": self.files, "names": self.names, "options": options}
        if self.errors is not None:
            content["errors"] = self.errors
        return content

    def digest(self) -> str:
        """The plan's identity (part of a generation run's): SHA-256 of its table (format 2), which fixes
        every job; of its job list for a list-backed plan, as format 1 defined it."""
        if not self.is_table:
            return self.job_list_digest()
        return hashlib.sha256(json.dumps(self._content(), sort_keys=True).encode()).hexdigest()

    def job_list_digest(self) -> str:
        """SHA-256 of the job list as format 1 computed it (a run started on a format-1 plan recorded this;
        linear in the number of jobs)."""
        h = hashlib.sha256()
        for j in self.jobs:
            h.update(json.dumps(asdict(j), sort_keys=True).encode())
        return h.hexdigest()

    def index(self, jid: str) -> int:
        """The position of a job id in the plan (ValueError if it is not one of its jobs)."""
        if self.is_table:
            return self.jobs.index(jid)
        if getattr(self, "_ids", None) is None:
            self._ids = {j.job_id: n for n, j in enumerate(self.jobs)}
        try:
            return self._ids[jid]
        except KeyError:
            raise ValueError(f"{jid!r} is not a job id of this plan") from None

    def class_array(self) -> np.ndarray:
        """The class index of every job."""
        if self.is_table:
            return self.jobs.class_array()
        return np.fromiter((j.class_index for j in self.jobs), dtype=np.int32, count=len(self.jobs))


def _recorded_options(options: PlanOptions) -> dict:
    values = asdict(options)
    for f in fields(options):
        neutral = f.metadata.get("neutral", MISSING)
        other = f.metadata.get("inert_unless")
        if (neutral is not MISSING and values[f.name] == neutral) or (
                other and getattr(options, other) is None):
            del values[f.name]
    return values


def split_budget(total: int, errors: dict[str, float], floor: int, power: float) -> dict[str, int]:
    """``total`` images over the classes of ``errors``: ``floor`` each, the rest in proportion to
    ``error ** power`` (all errors 0, or power 0: evenly), rounded by largest remainder (ties: class
    order), so the budgets add up to ``total`` exactly.
    docs/production.md, "Allocation by the classifier's errors"."""
    classes = list(errors)
    free = total - floor * len(classes)
    if free < 0:
        raise InputError(f"--allocate-floor {floor} x {len(classes)} classes is more than the budget, "
                         f"{total} images: lower the floor")
    weights = [max(errors[c], 0.0) ** power for c in classes]
    if sum(weights) == 0:
        weights = [1.0] * len(classes)
    shares = [free * w / sum(weights) for w in weights]
    base = [math.floor(round(x, 9)) for x in shares]
    order = sorted(range(len(classes)), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[:free - sum(base)]:
        base[i] += 1
    return {c: floor + b for c, b in zip(classes, base)}


def make_plan(scan: ImageFolderScan, options: PlanOptions | None = None,
              class_names: dict[str, str] | None = None, errors: dict[str, float] | None = None) -> Plan:
    """Deficits to the target (or, with ``errors``, their total split by them: ``split_budget``) and one job
    per missing image, classes in ImageFolder order."""
    options = options or PlanOptions()
    if (errors is None) != (options.allocate is None):
        raise InputError("--allocate errors needs the classifier's per-class errors (and errors need it)")
    real = scan.counts()
    names = {c: (class_names or {}).get(c, c) for c in scan.classes}
    files = {c: list(scan.files[c]) for c in scan.classes}
    plan = Plan(str(scan.root), list(scan.classes), real, {}, options, [], files, names,
                None if errors is None else {c: float(errors[c]) for c in scan.classes})
    plan.deficit = {c: math.ceil(round(k * options.oversample, 6)) for c, k in plan.keep.items()}
    plan.jobs = JobTable(list(scan.classes), plan.deficit, files, names, options.run_seed,
                         options.prompt_template)
    return plan


def write_plan(plan: Plan, out: str | Path) -> Path:
    """Write ``out/plan.json`` (created, atomically; a format-1 ``jobs.jsonl`` left there is removed after it)
    and returns the folder. A list-backed plan (jobs chosen in code) is written in format 1."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data_root": plan.data_root, "classes": plan.classes, "real": plan.real, "deficit": plan.deficit,
            "options": asdict(plan.options), "jobs": len(plan.jobs), "digest": plan.digest()}
    if plan.is_table:
        atomic_write(out / PLAN_FILE, (json.dumps({**meta, **plan._content()}, indent=1) + "\n").encode())
        (out / JOBS_FILE).unlink(missing_ok=True)
    else:
        atomic_write(out / JOBS_FILE, "".join(json.dumps(asdict(j)) + "\n" for j in plan.jobs).encode())
        atomic_write(out / PLAN_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    return out


def read_plan(out: str | Path) -> Plan:
    """The plan written by ``fgds plan`` into ``out`` (either format); a damaged or edited one is an
    InputError."""
    out = Path(out)
    if not (out / PLAN_FILE).is_file():
        raise InputError(f"no plan in {out}: run `fgds plan DATA {out}` first")
    try:
        meta = json.loads((out / PLAN_FILE).read_text())
        fmt = meta.get("format", 1)
        if fmt > PLAN_FORMAT:
            raise InputError(f"{out / PLAN_FILE} is a plan of format {fmt}, written by a newer release (this "
                             f"one reads formats 1 and {PLAN_FORMAT}): upgrade fgds-engine")
        for c in meta["classes"]:
            safe_name(c, "class name")
        options = PlanOptions(**meta["options"])
        if fmt == 1:
            if not (out / JOBS_FILE).is_file():
                raise InputError(f"no plan in {out}: run `fgds plan DATA {out}` first")
            jobs = [Job.from_dict(json.loads(line)) for line in (out / JOBS_FILE).read_text().splitlines()
                    if line]
            plan = Plan(meta["data_root"], meta["classes"], meta["real"], meta["deficit"], options, jobs)
            where = out / JOBS_FILE
        else:
            files, names = meta["files"], meta["names"]
            jobs = JobTable(meta["classes"], meta["deficit"], files, names, options.run_seed,
                            options.prompt_template)
            plan = Plan(meta["data_root"], meta["classes"], meta["real"], meta["deficit"], options, jobs,
                        files, names, meta.get("errors"))
            where = out / PLAN_FILE
            if any(not files[c] for c in meta["classes"] if meta["deficit"][c]):
                raise KeyError("files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise InputError(f"{out / PLAN_FILE} is damaged (cut short or edited?): plan again with `fgds plan "
                         f"DATA {out}`") from None
    if plan.digest() != meta["digest"] or len(plan.jobs) != meta["jobs"]:
        raise InputError(f"{where} does not match its digest in {out / PLAN_FILE} (edited by hand?); plan "
                         "again")
    return plan
