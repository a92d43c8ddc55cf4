"""The GPU harvest: every GPU check and benchmark of the project in one command, sized to a lent machine.

    python3 benchmarks/gpu/driver.py [--deadline 540] [--wheels .whl] [--only STEP ...]
    python3 benchmarks/gpu/driver.py --dry-run [--dry-size small|real] --out DIR

(``benchmarks/gpu_check.sh`` calls this; README "Running the GPU check" has the exact command line.)

The lent machine returns at most 8 files from ``$OUT`` and kills a command at its limit, so:
- every step writes into a work folder (``--work``, default a temporary folder); after **every** step, and
  every 30 s while one runs, ``$OUT`` is refreshed with exactly three files: ``harvest.tar.gz`` (every log
  and JSON of the work folder), ``summary.json`` (each step's status, seconds and headline numbers so far)
  and ``harvest.log`` (this driver's log). Nothing else is written to ``$OUT``;
- one overall deadline: each step runs for at most min(its own limit, what is left less the SIGINT grace
  period and a reserve for the final refresh); a step is skipped, and said so, when under ``--min-step``
  seconds would remain;
- steps run with PYTHONUNBUFFERED=1 in their own process group and are stopped with SIGINT first (pytest
  and the benchmarks then print and save what they have), killed only after a grace period;
- steps come in order of value: the GPU correctness tests, the sd15-256 headline, the fused step, sd15-256
  under DPM-Solver++ 2M at 15 steps (the scheduler SD users run), sd15-512, feedback at every step, the
  pytest-benchmark micro-benchmarks (GPU only), the Triton kernel tests; last, only where the deadline
  leaves room, SDXL at 1024 px (2.6 B-parameter UNet, feedback every 5th of 20 steps, batches 1, 4, auto),
  then FLUX.1-dev's transformer (11.9 B) at 512 px under its own flow scheduler (batches 1, 4).

``--dry-run`` runs the same plan on a CPU, at small sizes, to completion: it records the environment, installs
the given wheels into a temporary ``--target``, finds nvcc, collects the GPU tests, and runs every bench step
end to end (the tiny preset for the sd15 rows, the tiny SDXL pipeline for the SDXL row, the tiny
FLUX.1-dev-style pipeline for the Flux row, each at one feedback step with ``--probe-memory``), so that each
step's command, JSON, headline and the packing of ``$OUT`` are proven. ``--dry-size real`` takes the sd15-256
preset at its real size (SD 1.5's UNet and VAE configs, random weights) and the SDXL row in float16 instead
(``make dry-run``; minutes on a 2-core CPU). A dry run is never cut by the GPU's limits, which say nothing
about a CPU: each step has only a safety net (``--dry-step-limit``, for a hung step). The GPU plan's limits
and deadline are checked by arithmetic (``check_plan``: each step can run, each bench keeps a budget, the
correctness steps fit even when every step before them uses its whole limit, the deadline fits one device
command) in every run, dry or not, and recorded in ``summary.json`` as ``plan_check``. Only the Python
standard library is used here, so the driver runs before anything else is importable. """

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_FILES = ("harvest.tar.gz", "summary.json", "harvest.log")  # all that is ever written to $OUT
MAX_OUT_FILES = 8  # what the lent machine returns
COMMAND_LIMIT = 600  # seconds one command may run on the lent machine
START_MARGIN = 30  # seconds of a command outside the deadline's clock: the interpreter's start, the last copy
BENCH_MARGIN = 25  # seconds a bench step's --max-seconds leaves below its limit: to save its JSON
DRY_SIZES = ("small", "real")
NVCC_DIRS = (
    "/usr/local/cuda/bin",
    "/usr/local/cuda-*/bin",
    "/opt/cuda/bin",
    "/usr/lib/nvidia-cuda-toolkit/bin",
    "/opt/nvidia/*/bin",
)
GPU_TESTS = ["tests/test_ops_gpu.py", "tests/test_graphs.py"]


@dataclass
class Step:
    """One harvest step: ``cmd`` on the GPU under ``limit`` seconds, ``dry`` in the dry run (None: only
    planned there); ``must_run``: a correctness step, which must fit the deadline even when every step before
    it uses its whole limit (``check_plan``)."""

    name: str
    limit: int
    cmd: list[str] | None
    dry: list[str] | None = None
    must_run: bool = False
    kind: str = "plain"  # plain | pytest | bench | bench-step | env | nvcc
    result: str | None = None  # the JSON file it writes, relative to the work folder
    env: dict[str, str] = field(default_factory=dict)
    dry_env: dict[str, str] = field(default_factory=dict)


def gpu_plan(py: str, work: Path, dry_size: str = "small") -> list[Step]:
    """The steps, in order of value; ``dry_size``: the models of the dry run's bench steps."""
    fgds = [py, "-m", "fgds_engine.cli", "bench"]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    me = [py, str(ROOT / "benchmarks" / "gpu" / "driver.py")]
    triton = [*pytest, "tests/test_ops_triton.py"]
    step_bench = [py, str(ROOT / "benchmarks" / "bench_step.py"), "--json", str(work / "bench-step.json")]
    # the dry run: one (feedback) step at batch 1, the memory lines at batches 1 and 2; "real": SD 1.5 at its
    # real size (minutes on a 2-core CPU), "small": the tiny preset (seconds), the same code path
    one_step = "--batches 1 --steps 1 --feedback-every 1 --repeats 1 --warmup 0 --device cpu --probe-memory"
    sd15_dry = f"--preset {'sd15-256' if dry_size == 'real' else 'tiny'} {one_step}"
    # SDXL: the tiny SDXL pipeline's UNet and VAE (text_time conditioning, the VAE in float32 under a float16
    # run); float16 only at the real size: a CPU without fp16 vector units runs it 5-20x slower
    xl_dtype = "float16" if dry_size == "real" else "float32"
    xl_dry = (f"--preset sdxl-tiny --batches 1 auto --steps 1 --feedback-every 1 --repeats 1 --warmup 0 "
              f"--device cpu --dtype {xl_dtype} --probe-memory")

    def bench(name, preset, args, limit, dry=None):
        out = str(work / f"{name}.json")
        cmd = [*fgds, "--preset", preset, *args.split(), "--dtype", "float16", "--json", out,
               "--max-seconds", str(limit - BENCH_MARGIN)]
        dry = None if dry is None else [*fgds, *dry.split(), "--json", out]
        return Step(name, limit, cmd, dry, kind="bench", result=f"{name}.json")

    return [
        Step("env", 90, [*me, "--record-env", str(work / "env.json")],
             [*me, "--record-env", str(work / "env.json")], must_run=True, kind="env", result="env.json"),
        Step("build-cuda-lib", 150, ["<nvcc>"], ["<nvcc>"], must_run=True, kind="nvcc"),
        Step("gpu-tests", 200, [*pytest, "-m", "gpu", *GPU_TESTS, "--junitxml", str(work / "gpu-tests.xml")],
             [*pytest, "-m", "gpu", *GPU_TESTS, "--collect-only"], must_run=True, kind="pytest",
             env={"FGDS_REQUIRE_CUDA_LIB": "1"}),
        bench("bench-sd15-256", "sd15-256", "--batches 1 8 32 --feedback-every 5", 200, sd15_dry),
        Step("bench-step", 60, step_bench,
             [*step_bench, *"--batch 2 --shape 4 8 8 --repeats 1 --device cpu".split()],
             kind="bench-step", result="bench-step.json"),
        bench("bench-sd15-256-dpmpp", "sd15-256",
              "--scheduler dpmpp-2m --steps 15 --batches 8 32 --feedback-every 3", 90),
        bench("bench-sd15-512", "sd15-512", "--batches 1 8 auto --feedback-every 5", 150),
        bench("bench-sd15-256-every1", "sd15-256", "--batches 8 32 --feedback-every 1", 90),
        Step("bench-micro", 60, [*pytest, "benchmarks/test_micro.py", "--benchmark-max-time", "0.2",
                                 "--benchmark-json", str(work / "bench-micro.json"),
                                 "--junitxml", str(work / "bench-micro.xml")], kind="pytest"),
        Step("triton-tests", 90, [*triton, "--junitxml", str(work / "triton-tests.xml")],
             [*triton, "--collect-only"], kind="pytest", dry_env={"TRITON_INTERPRET": "1"}),
        # last, only where the deadline leaves room: SDXL's published UNet (2.6 B) and VAE at 1024 px, random
        # weights
        Step("bench-sdxl-1024", 150, [*fgds, "--preset", "sdxl-1024", *"--batches 1 4 auto --steps 20 "
                                      "--feedback-every 5 --dtype float16 --max-seconds".split(),
                                      str(150 - BENCH_MARGIN),
                                      "--json", str(work / "bench-sdxl-1024.json")],
             [*fgds, *xl_dry.split(), "--json", str(work / "bench-sdxl-1024.json")], kind="bench",
             result="bench-sdxl-1024.json"),
        # then a transformer family: FLUX.1-dev's published transformer (11.9 B, guidance-distilled: no
        # unconditional pass) at 512 px under its own dynamically shifted FlowMatchEuler; the dry run: the
        # tiny FLUX.1-dev-style pipeline's models
        bench("bench-flux-512", "flux-dev-512", "--batches 1 4 --steps 20 --feedback-every 5 --probe-memory",
              120, f"--preset flux-tiny {one_step} --steps 2"),  # one flow step cannot push
    ]


def check_plan(steps: list[Step], deadline: float, *, reserve: float, grace: float, min_step: float,
               command_limit: float = COMMAND_LIMIT) -> dict:
    """The GPU plan's limits checked by arithmetic, not by running anything: what the deadline leaves each
    step, each step's worst-case start (every step before it using its whole limit), and the problems: a
    deadline that does not fit one device command, a step that could never start or never use its limit, a
    bench left no budget, a correctness step (``must_run``) that may not fit, names or result files used
    twice. The driver records it in ``summary.json``; the dry run's test asserts it has no problem."""
    usable = deadline - reserve - grace  # what a step may be given: its SIGINT grace fits the deadline
    problems, rows, start = [], {}, 0.0
    if deadline + START_MARGIN > command_limit:
        problems.append(f"the deadline {deadline:g} s and {START_MARGIN} s of start-up exceed the "
                        f"{command_limit:g} s one device command may run")
    for what, values in (("step name", [s.name for s in steps]),
                         ("result file", [s.result for s in steps if s.result])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            problems.append(f"{what}(s) used twice: {twice}")
    for s in steps:
        fits = start + s.limit <= usable
        rows[s.name] = {"limit_s": s.limit, "worst_case_start_s": start, "fits_worst_case": fits}
        if s.limit < min_step:
            problems.append(f"{s.name}: its limit {s.limit} s is under --min-step {min_step:g} s: "
                            "it never runs")
        if s.limit > usable:
            problems.append(f"{s.name}: its limit {s.limit} s exceeds the {usable:g} s the deadline leaves "
                            "a step")
        if s.cmd and "--max-seconds" in s.cmd and s.limit - BENCH_MARGIN < 10:
            problems.append(f"{s.name}: its limit {s.limit} s leaves its bench under 10 s of --max-seconds")
        if s.must_run and not fits:
            problems.append(f"{s.name}: a correctness step, may start only at {start:g} s and not finish "
                            f"by {usable:g} s")
        start += s.limit
    return {"deadline_s": deadline, "command_limit_s": command_limit, "usable_s": usable, "steps": rows,
            "problems": problems}


# ---------------------------------------------------------------------------------------------- helpers


def find_nvcc() -> str | None:
    """nvcc on PATH, else in the usual CUDA folders (newest first)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for pattern in NVCC_DIRS:
        for d in sorted(glob.glob(pattern), reverse=True):
            if os.access(os.path.join(d, "nvcc"), os.X_OK):
                return os.path.join(d, "nvcc")
    return None


def record_env(path: Path) -> None:
    """Versions of Python, torch and every package the steps import, the GPU, the carried wheels."""
    import importlib
    import platform

    out = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    try:
        import torch

        out.update(
            torch=torch.__version__,
            cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available(),
            device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        )
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out.update(
                device_memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count,
                capability=f"{p.major}.{p.minor}",
            )
    except Exception as e:  # noqa: BLE001 -- recorded, never fatal
        out["torch"] = f"import failed: {type(e).__name__}: {e}"
    names = "triton diffusers transformers huggingface_hub timm safetensors numpy PIL tqdm sklearn pytest"
    for name in (*names.split(), "open_clip", "webdataset", "xformers", "peft"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__})"
    # with PEFT importable, diffusers routes UNet forwards through PEFT's layer scaling: say which path ran
    for name, what in (("peft_tuners_utils", "peft.tuners.tuners_utils"), ("diffusers_peft_backend", None)):
        try:
            if what:
                importlib.import_module(what)
                out[name] = "imports"
            else:
                out[name] = bool(importlib.import_module("diffusers.utils").USE_PEFT_BACKEND)
        except Exception as e:  # noqa: BLE001
            out[name] = f"fails ({type(e).__name__}: {e})"
    target = os.environ.get("HARVEST_TARGET")
    if target:
        out["wheels_installed"] = sorted(p.name for p in Path(target).glob("*.dist-info"))
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm"
        q = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = (q.stdout or q.stderr).strip()
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def pack(work: Path, dest: Path, files: list[Path] | None = None) -> list[str]:
    """Every file of ``work`` (no dot-files) into the tar.gz ``dest``; returns the names packed.

    Each file is read whole before its header is written: a step that renames or rewrites a file while it is
    packed (its JSON, atomically, after every row) can neither break the archive nor stop the harvest; a file
    gone since the listing is left out."""
    import io

    names = []
    with tarfile.open(dest, "w:gz") as tar:
        for p in sorted(files if files is not None else work.rglob("*")):
            if p.name.startswith("."):
                continue
            try:
                if not p.is_file():
                    continue
                data, mtime = p.read_bytes(), p.stat().st_mtime
            except OSError:  # gone (renamed, removed) between the listing and the read
                continue
            info = tarfile.TarInfo(str(p.relative_to(work)))
            info.size, info.mtime = len(data), int(mtime)
            tar.addfile(info, io.BytesIO(data))
            names.append(info.name)
    return names


def pytest_counts(xml: Path, log: Path) -> dict:
    """passed / failed / errors / skipped from a JUnit file, or the count a --collect-only log names."""
    if xml.is_file():
        try:
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            return {"passed": n - f - e - s, "failed": f, "errors": e, "skipped": s}
        except (ET.ParseError, AttributeError, ValueError):
            pass
    text = log.read_text(errors="replace") if log.is_file() else ""
    for line in reversed(text.splitlines()):
        words = line.split()
        if "collected" in line and words and words[0].split("/")[0].isdigit():
            return {"collected": int(words[0].split("/")[0])}
    return {}


def bench_headline(path: Path) -> dict:
    """Per feedback frequency: each row's ratio to the reference (or its status), the price of feedback."""
    if not path.is_file():
        return {}
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"error": "unreadable JSON"}
    out = {
        "device": r.get("device"),
        "complete": r.get("complete"),
        "dtype": r.get("dtype"),
        "peak_tflops": r.get("matmul_peak_tflops"),
    }
    for key in ("auto_batch", "memory_lines_gib"):
        if key in r:
            out[key] = r[key]
    for run in r.get("runs", []):
        rows = {}
        for row in run.get("rows", []):
            if row.get("impl", "").startswith("paper"):
                continue
            key = f"{row.get('impl')} b{row.get('batch')}"
            if row.get("per_sample_s") is None:
                rows[key] = row.get("status", "?")
            else:  # the ratio is filled in after a batch loop: a cut bench leaves rows without it
                ratio = row.get("ratio")
                rows[key] = (f"{ratio:.2f}x, " if ratio is not None else "no ratio, ") + (
                    f"{row['per_sample_s']:.4g} s/sample" + (f", {row['dtype']}" if row.get("dtype") else ""))
        out[f"feedback every {run.get('feedback_every')}"] = {
            "rows": rows,
            "feedback_cost_factor": run.get("feedback_cost_factor"),
            "fraction_of_peak": run.get("fraction_of_peak"),
        }
    return out


def step_headline(step: Step, work: Path) -> dict:
    log = work / f"{step.name}.log"
    if step.kind == "pytest":
        return pytest_counts(work / f"{step.name}.xml", log)
    if step.kind == "bench":
        return bench_headline(work / step.result)
    if step.kind == "bench-step" and (work / step.result).is_file():
        try:
            rows = json.loads((work / step.result).read_text()).get("rows", [])
        except json.JSONDecodeError:
            return {"error": "unreadable JSON"}
        return {
            f"{r['impl']} feedback={r['feedback']}": f"{r['speedup']:.2f}x eager, "
            f"{r.get('fraction_of_copy_bw', 0):.0%} of copy"
            for r in rows
        }
    if step.kind == "env" and (work / step.result).is_file():
        env = json.loads((work / step.result).read_text())
        keys = ("device", "torch", "triton", "diffusers", "cuda", "peft", "diffusers_peft_backend")
        return {k: env.get(k) for k in keys}
    if step.kind == "nvcc" and log.is_file():
        return {"nvcc": next((ln for ln in log.read_text().splitlines() if "release" in ln), None)}
    return {}


# ---------------------------------------------------------------------------------------------- the driver


def _default_sigint() -> None:
    """In the step's process, before exec: SIGINT back to its default. A harvest started in the background by
    a non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the
    step could not stop cleanly (seen in a CI run: every cut step was killed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Harvest:
    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.out = Path(args.out)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="harvest-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "harvest.log"
        self.summary = {
            "dry_run": args.dry_run,
            "dry_size": args.dry_size if args.dry_run else None,
            "deadline_s": args.deadline,  # the GPU run's; a dry run checks it by arithmetic (plan_check)
            "started": time.strftime("%F %T"),
            "finished": False,
            "elapsed_s": 0,
            "steps": {},
        }
        self.lock = threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARVEST_WORK": str(self.work)}
        self.env.pop("OUT", None)  # no step may write to $OUT: only the driver does
        paths = (
            [str(ROOT)]
            + ([args.target] if args.wheels else [])
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        if args.wheels:
            self.env["HARVEST_TARGET"] = args.target

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def log(self, msg: str) -> None:
        line = f"[harvest +{time.monotonic() - self.start:5.0f}s] {msg}"
        print(line, flush=True)
        with self.lock, open(self.log_path, "a") as f:
            f.write(line + "\n")

    def refresh(self) -> None:
        """Rewrite the three files of $OUT (each through a temporary name) and check the file limit."""
        with self.lock:
            self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
            (self.work / "summary.json").write_text(json.dumps(self.summary, indent=1))
            tmp = self.out / ".harvest.tar.gz.tmp"
            pack(self.work, tmp)
            os.replace(tmp, self.out / "harvest.tar.gz")
            for name in ("summary.json", "harvest.log"):
                src = self.work / name
                if src.is_file():
                    shutil.copyfile(src, self.out / f".{name}.tmp")
                    os.replace(self.out / f".{name}.tmp", self.out / name)
            files = [p for p in self.out.rglob("*") if p.is_file()]
        if len(files) > MAX_OUT_FILES:
            raise SystemExit(
                f"harvest: $OUT holds {len(files)} files, more than the {MAX_OUT_FILES} that come "
                f"back: {sorted(str(p) for p in files)}"
            )

    def refresh_while_running(self) -> None:
        """``refresh`` during a step: an error of the packing is logged, never the end of the harvest (the
        8-file limit still stops it)."""
        try:
            self.refresh()
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            self.log(f"refresh failed ({type(e).__name__}: {e}); the next one tries again")

    def record(self, name: str, **info) -> None:
        with self.lock:
            self.summary["steps"].setdefault(name, {}).update(info)

    def run_step(self, step: Step) -> None:
        dry = self.args.dry_run
        cmd = step.dry if dry else step.cmd
        if cmd is None:
            self.record(step.name, status="planned", limit_s=step.limit)
            self.log(f"{step.name}: planned (runs on the GPU only)")
            return
        if dry:  # a CPU's speed says nothing of the GPU's limits: only a safety net for a hung step
            cap = int(self.args.dry_step_limit)
        else:
            left = self.left() - self.args.reserve - self.args.grace  # a cut step's grace fits the deadline
            if left < self.args.min_step:
                note = f"only {max(left, 0):.0f} s left of the deadline"
                self.record(step.name, status="skipped", note=note)
                self.log(f"{step.name}: skipped, {max(left, 0):.0f} s left (< {self.args.min_step} s)")
                return
            cap = int(min(step.limit, left))
            if "--max-seconds" in cmd:  # the bench's own budget follows the step's actual limit
                i = cmd.index("--max-seconds") + 1
                cmd = [*cmd[:i], str(max(cap - BENCH_MARGIN, 10)), *cmd[i + 1:]]
        if step.kind == "nvcc":
            cmd = self.nvcc_command(step)
            if cmd is None:
                return
        self.log(f"{step.name}: limit {cap} s: {' '.join(cmd)}")
        self.record(step.name, status="running", limit_s=cap)
        rc, secs, how = self.execute(step, cmd, cap)
        status = "ok" if rc == 0 else ("timeout" if how else "failed")
        if step.kind == "pytest" and rc == 5:
            status = "failed"  # no tests collected is a failure of the harvest
        try:
            headline = step_headline(step, self.work)
        except Exception as e:  # noqa: BLE001 -- recorded; the harvest goes on
            headline = {"error": f"reading the step's output: {type(e).__name__}: {e}"}
        self.record(step.name, status=status, rc=rc, seconds=round(secs, 1), stopped_by=how,
                    headline=headline)
        self.log(f"{step.name}: {status} (exit {rc}, {secs:.0f} s{', ' + how if how else ''})")
        tail = (self.work / f"{step.name}.log").read_text(errors="replace").splitlines()[-4:]
        for line in tail:
            self.log(f"    {line[:200]}")

    def nvcc_command(self, step: Step) -> list[str] | None:
        nvcc = find_nvcc()
        if nvcc is None:
            note = f"nvcc not found on PATH nor in {', '.join(NVCC_DIRS)}: the CUDA library is not built"
            (self.work / f"{step.name}.log").write_text(note + "\n")
            self.record(step.name, status="failed", note=note)
            self.log(f"{step.name}: failed: {note}")
            return None
        version = f"{nvcc} --version"
        if self.args.dry_run:
            return ["bash", "-c", version]
        cmake = shutil.which("cmake") or "cmake"
        return [
            "bash",
            "-c",
            f"{version} && {cmake} -S {ROOT} -B {ROOT}/build -DCMAKE_CUDA_COMPILER={nvcc} "
            f"-DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release && {cmake} --build {ROOT}/build -j 16",
        ]

    def execute(self, step: Step, cmd: list[str], cap: int) -> tuple[int, float, str | None]:
        """Run ``cmd`` in its own process group; SIGINT at the cap, SIGKILL after the grace period."""
        t0 = time.monotonic()
        with open(self.work / f"{step.name}.log", "w") as logf:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **step.env, **(step.dry_env if self.args.dry_run else {})},
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
            how, next_refresh = None, t0 + self.args.refresh_every
            while proc.poll() is None:
                now = time.monotonic()
                if how is None and now - t0 > cap:
                    how = "SIGINT at its limit"
                    os.killpg(proc.pid, signal.SIGINT)
                    kill_at = now + self.args.grace
                elif how is not None and now > kill_at:
                    how = "killed after SIGINT"
                    os.killpg(proc.pid, signal.SIGKILL)
                if now > next_refresh:
                    self.record(step.name, seconds=round(now - t0, 1))
                    self.refresh_while_running()
                    next_refresh = now + self.args.refresh_every
                time.sleep(0.2)
        try:  # anything the step left running in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode, time.monotonic() - t0, how

    def install_wheels(self) -> None:
        wheels = sorted(Path(self.args.wheels).glob("*.whl"))
        if not wheels:
            self.record("install-wheels", status="failed", note=f"no wheels in {self.args.wheels}")
            self.log(f"install-wheels: failed: no *.whl in {self.args.wheels}")
            return
        pip = "-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
        cmd = [sys.executable, *pip.split(), self.args.target, *map(str, wheels)]
        self.run_step(Step("install-wheels", 120, cmd, cmd))

    def main(self) -> int:
        self.log(
            f"work folder {self.work}; $OUT {self.out}; deadline {self.args.deadline} s"
            f"{' (dry run)' if self.args.dry_run else ''}"
        )
        steps = gpu_plan(sys.executable, self.work, self.args.dry_size)
        if self.args.steps_file:
            steps = [Step(**s) for s in json.loads(Path(self.args.steps_file).read_text())]
        if self.args.only:
            unknown = set(self.args.only) - {s.name for s in steps}
            if unknown:
                raise SystemExit(
                    f"harvest: unknown step(s) {sorted(unknown)}; steps: {[s.name for s in steps]}"
                )
            steps = [s for s in steps if s.name in self.args.only or s.name == "env"]
        a = self.args  # the plan that runs, checked against its deadline
        check = check_plan(steps, a.deadline, reserve=a.reserve, grace=a.grace, min_step=a.min_step)
        self.summary["plan_check"] = check
        for problem in check["problems"]:
            self.log(f"plan check: {problem}")
        self.summary["plan"] = [s.name for s in steps]
        self.refresh()
        try:
            if self.args.wheels:
                self.install_wheels()
                self.refresh()
            for step in steps:
                self.run_step(step)
                self.refresh()
        except KeyboardInterrupt:
            self.log("interrupted: writing what there is")
        self.summary["finished"] = True
        failed = [n for n, s in self.summary["steps"].items() if s.get("status") in ("failed", "timeout")]
        self.summary["failed_steps"] = failed
        self.log(f"done in {time.monotonic() - self.start:.0f} s; failed or cut: {failed or 'none'}")
        self.refresh()
        return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="the folder that comes back [$OUT]")
    ap.add_argument("--work", help="where steps write logs and JSON [a new temporary folder]")
    ap.add_argument("--deadline", type=float, default=540,
                    help="seconds for the whole GPU harvest [540]; a dry run only checks the plan against it")
    ap.add_argument("--min-step", type=float, default=30, help="skip a step when fewer seconds remain [30]")
    ap.add_argument("--reserve", type=float, default=8, help="seconds kept for the final refresh [8]")
    ap.add_argument("--grace", type=float, default=15, help="seconds between SIGINT and SIGKILL [15]")
    ap.add_argument("--refresh-every", type=float, default=30, help="refresh $OUT while a step runs [30 s]")
    ap.add_argument("--wheels", help="folder of carried wheels to install first (no index, no deps)")
    ap.add_argument("--target", default=None, help="where the wheels go [WORK-independent temporary folder]")
    ap.add_argument("--only", nargs="+", help="run only these steps (and env): a short rerun")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same plan on a CPU, every step to completion, at small sizes")
    ap.add_argument("--dry-size", choices=DRY_SIZES, default="small",
                    help="the dry run's bench models: small (the tiny presets, seconds) or real (sd15-256 at "
                    "its real size, SDXL's row in float16: minutes on a 2-core CPU) [small]")
    ap.add_argument("--dry-step-limit", type=float, default=3600,
                    help="a dry run's safety net per step, for a hung step only [3600 s]")
    ap.add_argument("--steps-file", help=argparse.SUPPRESS)  # tests: replace the plan by a JSON list of steps
    ap.add_argument("--record-env", help=argparse.SUPPRESS)  # the env step itself
    args = ap.parse_args(argv)
    if args.record_env:
        return args
    if not args.out:
        ap.error("no output folder: set $OUT or pass --out")
    if args.wheels and not args.target:
        args.target = tempfile.mkdtemp(prefix="harvest-site-")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.record_env:
        record_env(Path(args.record_env))
        return 0
    return Harvest(args).main()


if __name__ == "__main__":
    sys.exit(main())
