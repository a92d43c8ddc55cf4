"""Production bookkeeping at 1 M and 10 M jobs: plan, status, a worker's memory and a resumed start.

    python benchmarks/bench_production_scale.py                  # 1 M and 10 M jobs (about 15 min here)
    python benchmarks/bench_production_scale.py --quick          # a smoke test (numbers mean nothing)

Builds a 1,000-class long-tailed ImageFolder of tiny images with the ImageNet-LT profile of the issue (1,280
down to 5 images per class, exponentially: 229,700 real images), then for each target per class (1,280:
1,049,660 jobs; 10,250: 10,020,300 jobs):

1. ``fgds plan`` (every image decoded once, as by default): wall time, peak resident memory, size on disk;
2. ``fgds generate --preset tiny-random`` (1 step, batches of 8, one thread): the worker's resident memory at
   its first image and after ``--images`` images, then SIGTERM;
3. a finished share of the run beside it (``--done-share``, default half the jobs): manifest records and unit
   records written as a second shard's worker would have left them (no images: status and resume read
   records, not images), with a tail (3 units' records after the part's last unit record, as a kill leaves
   them) and 2 failed jobs, so both slow paths are in;
4. ``fgds status``: wall time and peak memory;
5. the bookkeeping of a resumed worker, in a process of its own: ``read_plan`` + ``Progress.load`` (what it
   holds, whatever the plan's size: resident memory added, and seconds);
6. ``fgds generate`` resumed: seconds from the command's start to its first new image (interpreter, torch and
   model construction included), its resident memory then, and the seconds it took more than step 2's
   start on the fresh plan (what resuming adds); SIGTERM.

Every command runs in a child process (``/proc/<pid>/status`` for its memory; ``ru_maxrss`` for peaks).
Writes JSON with the machine, the commit and what ran beside it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fgds_engine.bench import commit, versions

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--preset", "tiny-random", "--batch-size", "8", "--num-inference-steps", "1", "--threads", "1",
         "--write-workers", "0", "--quiet"]
PART = "manifest-shard0of1-rank0of1.jsonl"


def lt_counts(classes: int, top: int = 1280, bottom: int = 5) -> list[int]:
    """ImageNet-LT's profile: ``top`` down to ``bottom`` images per class, exponentially."""
    return [round(top * (bottom / top) ** (i / (classes - 1))) for i in range(classes)]


def make_data(root: Path, counts: list[int]) -> None:
    """One tiny PNG per real image (8x8); the same bytes for every file of a class (fast to write)."""
    import io

    from PIL import Image

    if (root / ".complete").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for k in range(n):
            (d / f"{k:05d}.png").write_bytes(buf.getvalue())
    (root / ".complete").touch()


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from fgds_engine.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
      file=sys.stderr)
"""

BOOKKEEPING = """
import json, resource, sys, time
from pathlib import Path
from fgds_engine.plan import read_plan
from fgds_engine.production import Progress, WRITERS, RUN_FILE
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
out = Path(sys.argv[1])
run = json.loads((out / RUN_FILE).read_text())
writer = WRITERS["imagefolder"](out)
before = rss()
t0 = time.perf_counter()
plan = read_plan(out)
progress = Progress.load(out, plan, 8, run["config_hash"], writer)
seconds = time.perf_counter() - t0
print(json.dumps({"bookkeeping_s": seconds, "bookkeeping_mb": rss() - before, "rss_mb": rss(),
                  "complete_units": int(progress.complete.sum()), "failed": len(progress.failed)}))
"""


CODE = ROOT  # the checkout whose fgds_engine the commands run (--previous: another one)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{CODE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def timed(argv: list[str]) -> dict:
    """An ``fgds`` command in a child: wall seconds (interpreter start included) and peak memory."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env(),
                       cwd=CODE)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{argv[0]} failed: {p.stderr[-2000:]}")
    return {"s": wall, **json.loads(p.stderr.strip().splitlines()[-1])}


def rss_mb(pid: int) -> float:
    """Resident MB of a live process (0 once it has exited)."""
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return 0.0


def lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def worker(out: Path, images: int, first_after: int = 0) -> dict:
    """``fgds generate`` until ``images`` new records (0: the first), SIGTERM: seconds to the first new
    image, resident memory then and at the end."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "fgds_engine.cli", "generate", str(out), *FLAGS],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=CODE)
    first = first_rss = None
    peak = 0.0
    while True:
        ended = p.poll() is not None
        n = lines(out / PART) - first_after
        peak = max(peak, rss_mb(p.pid))
        if ended and n < max(images, 1):
            raise SystemExit(f"generate ended early (rc {p.returncode}): {p.stderr.read()[-2000:]}")
        if n >= 1 and first is None:
            first, first_rss = time.perf_counter() - t0, rss_mb(p.pid)
        if n >= max(images, 1):
            break
        time.sleep(0.02)
    last_rss = rss_mb(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait()
    return {"first_image_s": first, "rss_first_mb": first_rss, "rss_last_mb": last_rss, "peak_rss_mb": peak,
            "images": lines(out / PART) - first_after}


def simulate_done(out: Path, share: float, real_units: int) -> dict:
    """Records and unit records of a second part covering ``share`` of the jobs after the real worker's, a
    tail of 3 units without unit records and 2 failed jobs (their units recorded with 1 missing)."""
    from fgds_engine.plan import read_plan
    from fgds_engine.production import UNIT_RECORD, run_key, unit_check

    plan = read_plan(out)
    run_hash = json.loads((out / "run.json").read_text())["config_hash"]
    n_jobs, size = len(plan.jobs), 8
    first, last = real_units + 1, min(real_units + 1 + int(share * n_jobs / size), -(-n_jobs // size))
    failed = {first * size + 3, (first + 5) * size + 1}
    tail_units = set(range(last - 3, last))
    part, units = out / "manifest-shard1of2-rank0of1.jsonl", out / "units-shard1of2-rank0of1.bin"
    offsets = plan.jobs.offsets
    classes = plan.classes
    rows, pos = [], 0
    with open(part, "wb") as f:
        for u in range(first, last):
            start, buf, missing = pos, [], 0
            for n in range(u * size, min((u + 1) * size, n_jobs)):
                c = bisect.bisect_right(offsets, n) - 1
                jid = f"{c:05d}_{n - offsets[c]:06d}"
                nan = n in failed
                missing += nan
                buf.append(f'{{"class": "{classes[c]}", "class_index": {c}, "config_hash": "{run_hash}", '
                           f'"criterion": {"null" if nan else 0.5}, "exemplar": "{classes[c]}/00000.png", '
                           f'"file": "{classes[c]}/{jid}.png", "job_id": "{jid}", "nan": '
                           f'{"true" if nan else "false"}, "retries": 0, "seed": 0, "seed_used": 0}}\n')
            data = "".join(buf).encode()
            f.write(data)
            pos += len(data)
            if u not in tail_units:
                rows.append((u, start, pos, missing))
    recs = np.array([(*r, unit_check(*r, run_key(run_hash))) for r in rows], dtype=UNIT_RECORD)
    units.write_bytes(recs.tobytes())
    # the images a resume looks at: the part's last complete unit, the tail's and the failed jobs' units
    from fgds_engine.writers import png_bytes

    png = png_bytes(np.zeros((8, 8, 3), np.uint8))
    for u in {rows[-1][0], *tail_units, *(n // size for n in failed)}:
        for n in range(u * size, min((u + 1) * size, n_jobs)):
            if n not in failed:
                job = plan.jobs[n]
                (out / job.class_name).mkdir(exist_ok=True)
                (out / job.class_name / f"{job.job_id}.png").write_bytes(png)
    return {"simulated_jobs": sum(min((u + 1) * size, n_jobs) - u * size for u in range(first, last)),
            "simulated_units": last - first, "manifest_mb": part.stat().st_size / 2**20,
            "unit_records_mb": units.stat().st_size / 2**20}


def run_target(work: Path, data: Path, target: int, images: int, share: float) -> dict:
    out = work / f"target{target}"
    shutil.rmtree(out, ignore_errors=True)
    plan = timed(["plan", str(data), str(out), "--target", str(target), "--quiet"])
    with open(out / "plan.json") as f:
        meta = json.load(f)
    row = {"target": target, "jobs": meta["jobs"], "classes": len(meta["classes"]),
           "real": sum(meta["real"].values()), "plan_s": plan["s"], "plan_peak_mb": plan["maxrss_mb"],
           "plan_bytes": sum(p.stat().st_size for p in out.iterdir())}
    print(f"target {target}: {row['jobs']:,} jobs planned in {plan['s']:.1f} s, peak "
          f"{plan['maxrss_mb']:.0f} MB, {row['plan_bytes'] / 2**20:.1f} MB on disk", flush=True)
    w = worker(out, images)
    row |= {"worker_first_image_s": w["first_image_s"], "worker_rss_first_mb": w["rss_first_mb"],
            "worker_rss_after_mb": w["rss_last_mb"], "worker_peak_rss_mb": w["peak_rss_mb"],
            "worker_images": w["images"]}
    print(f"  worker: {w['images']} images; resident {w['rss_first_mb']:.0f} MB at the first, "
          f"{w['rss_last_mb']:.0f} MB after", flush=True)
    row |= simulate_done(out, share, -(-w["images"] // 8))
    st = timed(["status", str(out)])
    row |= {"status_s": st["s"], "status_peak_mb": st["maxrss_mb"]}
    print(f"  {row['simulated_jobs']:,} jobs recorded done beside it; status {st['s']:.2f} s, peak "
          f"{st['maxrss_mb']:.0f} MB", flush=True)
    p = subprocess.run([sys.executable, "-c", BOOKKEEPING, str(out)], capture_output=True, text=True,
                       env=env(), cwd=CODE)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    book = json.loads(p.stdout.strip().splitlines()[-1])
    row |= {"bookkeeping_s": book["bookkeeping_s"], "bookkeeping_mb": book["bookkeeping_mb"]}
    r = worker(out, 1, first_after=lines(out / PART))
    row |= {"resume_first_image_s": r["first_image_s"], "resume_rss_mb": r["rss_first_mb"],
            "resume_overhead_s": r["first_image_s"] - w["first_image_s"]}
    print(f"  resumed worker: bookkeeping {book['bookkeeping_mb']:.1f} MB in {book['bookkeeping_s']:.2f} s; "
          f"first new image {r['first_image_s']:.1f} s after the command started, resident "
          f"{r['rss_first_mb']:.0f} MB", flush=True)
    shutil.rmtree(out)
    return row


def run_previous(work: Path, data: Path, target: int, images: int) -> dict:
    """The same plan, worker and status under the previous release's checkout: the figures it reports for
    the plan's size (its worker holds the job list; its status parses jobs.jsonl and every manifest
    record)."""
    out = work / f"previous{target}"
    shutil.rmtree(out, ignore_errors=True)
    plan = timed(["plan", str(data), str(out), "--target", str(target), "--quiet"])
    row = {"target": target, "jobs": lines(out / "jobs.jsonl"), "plan_s": plan["s"],
           "plan_peak_mb": plan["maxrss_mb"], "plan_bytes": sum(p.stat().st_size for p in out.iterdir())}
    w = worker(out, images)
    st = timed(["status", str(out)])
    row |= {"worker_first_image_s": w["first_image_s"], "worker_rss_first_mb": w["rss_first_mb"],
            "worker_rss_after_mb": w["rss_last_mb"], "worker_images": w["images"], "status_s": st["s"],
            "status_peak_mb": st["maxrss_mb"]}
    r = worker(out, 1, first_after=lines(out / PART))
    row |= {"resume_first_image_s": r["first_image_s"], "resume_rss_mb": r["rss_first_mb"]}
    print(f"previous release, target {target}: {row['jobs']:,} jobs; plan {row['plan_s']:.1f} s, peak "
          f"{row['plan_peak_mb']:.0f} MB, {row['plan_bytes'] / 2**20:.0f} MB; worker "
          f"{w['rss_first_mb']:.0f} MB; "
          f"status {st['s']:.1f} s; resumed worker's first image {r['first_image_s']:.1f} s", flush=True)
    shutil.rmtree(out)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default="/tmp/fgds-scale", help="data and run folders (the data is kept)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--targets", type=int, nargs="+", default=[1280, 10250], help="images per class to reach")
    ap.add_argument("--images", type=int, default=2000, help="tiny-random images the worker makes")
    ap.add_argument("--done-share", type=float, default=0.5, help="share of the jobs recorded done beside it")
    ap.add_argument("--quick", action="store_true", help="20 classes, target 40, 16 images")
    ap.add_argument("--beside", default="", help="what else ran on the machine (recorded)")
    ap.add_argument("--previous", help="a checkout of the previous release: measure it instead (its plan, "
                    "worker, status and resume; no done share), kept in the JSON's 'previous' beside this "
                    "release's rows")
    ap.add_argument("--json", default="benchmarks/results/bench_production_scale-cpu.json")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.targets, args.images = 20, [40], 16
    work = Path(args.work)
    counts = lt_counts(args.classes) if not args.quick else [max(2, c // 64) for c in lt_counts(args.classes)]
    data = work / f"data-{args.classes}{'-quick' if args.quick else ''}"
    t0 = time.perf_counter()
    make_data(data, counts)
    print(f"{len(counts)} classes, {sum(counts):,} real images in {data} ({time.perf_counter() - t0:.0f} s)")
    if args.previous:
        global CODE
        CODE = Path(args.previous).resolve()
        sha = subprocess.run(["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        rows = [run_previous(work, data, t, args.images) for t in args.targets]
        path = Path(args.json)
        result = json.loads(path.read_text()) if path.exists() else {}
        result["previous"] = {"commit": sha, "beside": args.beside, "rows": rows}
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
        return
    rows = [run_target(work, data, t, args.images, args.done_share) for t in args.targets]
    result = {"machine": f"{os.cpu_count()}-core CPU", **versions(), "commit": commit(), "quick": args.quick,
              "beside": args.beside, "classes": args.classes, "real_images": sum(counts),
              "worker_flags": FLAGS, "done_share": args.done_share, "rows": rows,
              "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
