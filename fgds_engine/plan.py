"""Plan a synthetic dataset: per-class deficits to a uniform target, and the job list that fills them.

A job is (job id, class, class index, seed, exemplar, prompt). Seeds and exemplars are pure functions of the
run seed and the job id (SHA-256), so a plan is reproducible and a job's image does not depend on which
process, shard or batch runs it. Written as ``plan.json`` (options and per-class table) and ``jobs.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import check_fields, option
from .data import ImageFolderScan, InputError, safe_name

PLAN_FILE, JOBS_FILE = "plan.json", "jobs.jsonl"


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
    """

    target: int | None = option(None, "images per class after filling (default: the largest class)", low=1)
    min_per_class: int = option(1, "synthetic images per class at least", low=0)
    run_seed: int = option(0, "seed of every job seed and exemplar")
    prompt_template: str = option("a photo of a {name}", "prompt, {name} = class name")

    def __post_init__(self):
        check_fields(self)
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


@dataclass
class Plan:
    data_root: str
    classes: list[str]
    real: dict[str, int]
    deficit: dict[str, int]
    options: PlanOptions
    jobs: list[Job]

    @property
    def target(self) -> int:
        return self.options.target or max(self.real.values())

    def table(self) -> str:
        """Per-class table (real, synthetic, total) and the totals."""
        w = max(12, *(len(c) for c in self.classes))
        lines = [f"{'class':{w}} {'index':>5} {'real':>8} {'synthetic':>10} {'total':>8}"]
        for i, c in enumerate(self.classes):
            lines.append(f"{c:{w}} {i:5d} {self.real[c]:8d} {self.deficit[c]:10d} "
                         f"{self.real[c] + self.deficit[c]:8d}")
        real, syn = sum(self.real.values()), sum(self.deficit.values())
        lines.append(f"{'total':{w}} {len(self.classes):5d} {real:8d} {syn:10d} {real + syn:8d}")
        return "\n".join(lines)

    def digest(self) -> str:
        """SHA-256 of the job list (part of a generation run's config hash)."""
        h = hashlib.sha256()
        for j in self.jobs:
            h.update(json.dumps(asdict(j), sort_keys=True).encode())
        return h.hexdigest()


def make_plan(scan: ImageFolderScan, options: PlanOptions | None = None,
              class_names: dict[str, str] | None = None) -> Plan:
    """Deficits to the target and one job per missing image, classes in ImageFolder order."""
    options = options or PlanOptions()
    real = scan.counts()
    target = options.target or max(real.values())
    names = class_names or {c: c for c in scan.classes}
    deficit, jobs = {}, []
    for index, c in enumerate(scan.classes):
        deficit[c] = max(target - real[c], options.min_per_class)
        for k in range(deficit[c]):
            job_id = f"{index:05d}_{k:06d}"
            files = scan.files[c]
            exemplar = files[derive_seed(options.run_seed, f"exemplar:{job_id}") % len(files)]
            jobs.append(Job(job_id, c, index, derive_seed(options.run_seed, job_id), f"{c}/{exemplar}",
                            options.prompt_template.format(name=names[c])))
    return Plan(str(scan.root), list(scan.classes), real, deficit, options, jobs)


def write_plan(plan: Plan, out: str | Path) -> Path:
    """Write plan.json and jobs.jsonl into ``out`` (created); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / JOBS_FILE).write_text("".join(json.dumps(asdict(j)) + "\n" for j in plan.jobs))
    meta = {"data_root": plan.data_root, "classes": plan.classes, "real": plan.real, "deficit": plan.deficit,
            "options": asdict(plan.options), "jobs": len(plan.jobs), "digest": plan.digest()}
    (out / PLAN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_plan(out: str | Path) -> Plan:
    """The plan written by ``fgds plan`` into ``out``."""
    out = Path(out)
    if not (out / PLAN_FILE).is_file() or not (out / JOBS_FILE).is_file():
        raise InputError(f"no plan in {out}: run `fgds plan DATA {out}` first")
    meta = json.loads((out / PLAN_FILE).read_text())
    jobs = [Job.from_dict(json.loads(line)) for line in (out / JOBS_FILE).read_text().splitlines() if line]
    for c in meta["classes"]:
        safe_name(c, "class name")
    plan = Plan(meta["data_root"], meta["classes"], meta["real"], meta["deficit"],
                PlanOptions(**meta["options"]), jobs)
    if plan.digest() != meta["digest"]:
        raise InputError(f"{out / JOBS_FILE} does not match {out / PLAN_FILE} (edited by hand?); plan again")
    return plan
