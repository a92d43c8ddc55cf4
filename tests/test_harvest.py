"""The GPU harvest (benchmarks/harvest.py behind gpu_check.sh), proven on the CPU: the 8-file limit of $OUT,
the overall deadline, the wheel install, the collection of the GPU tests, a device-like environment, and the
real-size sd15-256 path end to end (the dry run)."""

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HARVEST = ROOT / "benchmarks" / "harvest.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import harvest  # noqa: E402


def run_harvest(out: Path, *args, timeout=1200, env=None, sigint_ignored=False):
    """The driver in a subprocess; ``sigint_ignored``: started the way a non-interactive shell starts a
    background job (SIGINT ignored, inherited by everything it runs)."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.run([sys.executable, str(HARVEST), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=ignore)


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (one module), built here: the install mechanism without the network."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fgds_probe-0.1-py3-none-any.whl"
    dist = "fgds_probe-0.1.dist-info"
    files = {
        "fgds_probe.py": "VALUE = 41 + 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: fgds-probe\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def out_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_dry_run_same_plan_on_the_cpu(tmp_path):
    """Wheels into a temporary --target, nvcc found, GPU tests collected, sd15-256 engine vs reference at one
    (feedback) step and batch 1 with its memory lines, the fused-step benchmark; $OUT holds exactly three
    files; every step inside its dry-run limit (one that overran would be cut and fail here)."""
    out, work = tmp_path / "out", tmp_path / "work"
    probe_wheel(tmp_path / "wheels")
    res = run_harvest(out, "--dry-run", "--work", str(work), "--wheels", str(tmp_path / "wheels"), "--target",
                      str(tmp_path / "site"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out_files(out) == ["harvest.log", "harvest.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] is True and summary["finished"] is True and summary["failed_steps"] == []
    assert summary["deadline_s"] == 900
    assert list(steps)[:2] == ["install-wheels", "env"]  # the environment is recorded after the install
    assert steps["install-wheels"]["status"] == "ok"
    env = json.loads((work / "env.json").read_text())
    assert env["wheels_installed"] == ["fgds_probe-0.1.dist-info"] and env["torch"] == torch.__version__
    assert str(tmp_path / "site") in env["pythonpath"].split(os.pathsep)
    nvcc = steps["build-cuda-lib"]
    if harvest.find_nvcc():
        assert nvcc["status"] == "ok" and "release" in nvcc["headline"]["nvcc"]
    else:  # a missing compiler is a recorded failure, never a skip
        assert nvcc["status"] == "failed" and nvcc["note"].startswith("nvcc not found")
    assert steps["gpu-tests"]["status"] == "ok" and steps["gpu-tests"]["headline"]["collected"] >= 40
    assert steps["triton-tests"]["status"] == "ok" and steps["triton-tests"]["headline"]["collected"] >= 100
    sd = json.loads((work / "bench-sd15-256.json").read_text())
    assert sd["preset"] == "sd15-256" and sd["complete"] is True and sd["unet_params_M"] > 859
    run = sd["runs"][0]
    assert run["feedback_steps"] == 1
    rows = {(r["impl"], r.get("batch")): r for r in run["rows"]}
    assert rows["reference (demo loop)", 1]["per_sample_s"] > 0
    assert rows["engine", 1]["ratio"] > 0 and rows["engine, no feedback (same CFG)", 1]["per_sample_s"] > 0
    assert {r["dtype"] for r in rows.values() if "dtype" in r} == {"float32"}
    assert run["feedback_cost_factor"] > 1  # guided costs more than unguided
    lines = sd["memory_lines_gib"]  # batches 1 and 2 of each pass at the real size: the 512 px plan's input
    assert lines["feedback"][1] > lines["final"][1] > lines["cfg"][1] > 0
    assert steps["bench-sd15-256"]["headline"]["memory_lines_gib"] == lines
    assert env["peft_tuners_utils"] == "imports" and env["diffusers_peft_backend"] is True  # as on the device
    assert steps["bench-step"]["status"] == "ok"
    assert {steps[n]["status"] for n in ("bench-sd15-512", "bench-sd15-256-every1")} == {"planned"}
    # SDXL last, on the tiny SDXL pipeline's UNet and VAE: the VAE in float32 under a float16 run
    assert list(steps)[-1] == "bench-sdxl-1024" and steps["bench-sdxl-1024"]["status"] == "ok"
    xl = json.loads((work / "bench-sdxl-1024.json").read_text())
    assert xl["preset"] == "sdxl-tiny" and xl["complete"] is True
    assert xl["dtype"] == "unet float16, vae float32, classifier float16"
    assert xl["memory_lines_gib"]["feedback"][1] > xl["memory_lines_gib"]["cfg"][1] > 0
    assert xl["auto_batch"]["batch"] > 0
    with tarfile.open(out / "harvest.tar.gz") as tar:
        names = set(tar.getnames())
    assert {
        "env.json",
        "bench-sd15-256.json",
        "bench-sd15-256.log",
        "gpu-tests.log",
        "bench-step.json",
        "bench-sdxl-1024.json",
    } <= names


def _steps_file(tmp_path, steps) -> str:
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(steps))
    return str(path)


def test_the_deadline_cuts_a_slow_step_and_the_summary_is_complete(tmp_path):
    """A step that would run 120 s is stopped with SIGINT at the deadline (its unbuffered output is kept),
    the next is skipped and said so, and the driver itself ends in time."""
    slow = (
        "import signal, sys, time\nprint('started', flush=False)\n"
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    print('stopped cleanly'); sys.exit(3)\n"
    )
    steps = [
        {"name": "quick", "limit": 60, "cmd": [sys.executable, "-c", "print('quick done')"]},
        {"name": "slow", "limit": 120, "cmd": [sys.executable, "-c", slow]},
        {"name": "after", "limit": 60, "cmd": [sys.executable, "-c", "print('never')"]},
    ]
    out = tmp_path / "out"
    t0 = time.monotonic()
    # deadline 30 s: the slow step is cut at 30 - reserve 1 - grace 10 s after the harvest's start at the
    # latest, leaving it a 10 s grace even on a loaded machine
    args = "--deadline 30 --min-step 3 --reserve 1 --grace 10".split()
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), *args, "--work",
                      str(tmp_path / "work"), timeout=90, sigint_ignored=True)  # steps get SIGINT back
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert took < 40, f"the driver ran {took:.0f} s past a 30 s deadline"
    summary = json.loads((out / "summary.json").read_text())
    s = summary["steps"]
    assert summary["finished"] is True and summary["plan"] == ["quick", "slow", "after"]
    assert s["quick"]["status"] == "ok"
    assert s["slow"]["status"] == "timeout" and s["slow"]["stopped_by"] == "SIGINT at its limit"
    assert s["slow"]["rc"] == 3  # it handled the SIGINT: what it had printed is in its log
    assert (tmp_path / "work" / "slow.log").read_text().splitlines() == ["started", "stopped cleanly"]
    assert s["after"]["status"] == "skipped" and s["after"]["note"].endswith("s left of the deadline")
    assert summary["failed_steps"] == ["slow"]
    assert out_files(out) == ["harvest.log", "harvest.tar.gz", "summary.json"]


CUT_BENCH = {"preset": "sd15-512", "complete": False, "interrupted": True, "runs": [{
    "feedback_every": 5, "rows": [
        {"impl": "reference (demo loop)", "batch": 1, "per_sample_s": 2.0, "status": "ok"},
        {"impl": "engine", "batch": 8, "per_sample_s": 0.5, "status": "ok", "dtype": "float16"},
        {"impl": "engine", "batch": 64, "per_sample_s": None, "status": "oom"}]}]}


def test_a_cut_bench_is_summarised_and_the_harvest_goes_on(tmp_path):
    """A bench cut inside its batch loop leaves rows without a ratio (filled in after the loop): its step
    is summarised from what is there, a step whose output cannot be read at all says so, the next one runs."""
    work = tmp_path / "work"
    write = "import json, sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    steps = [
        {"name": "cut", "limit": 30, "kind": "bench", "result": "cut.json",
         "cmd": [sys.executable, "-c", write, str(work / "cut.json"), json.dumps(CUT_BENCH)]},
        {"name": "odd", "limit": 30, "kind": "bench", "result": "odd.json",
         "cmd": [sys.executable, "-c", write, str(work / "odd.json"), '{"runs": [{"rows": [7]}]}']},
        {"name": "next", "limit": 30, "cmd": [sys.executable, "-c", "print('ran')"]},
    ]
    out = tmp_path / "out"
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--work", str(work), timeout=60)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    s = summary["steps"]
    assert summary["finished"] is True and summary["failed_steps"] == []
    assert s["cut"]["headline"]["feedback every 5"]["rows"] == {
        "reference (demo loop) b1": "no ratio, 2 s/sample", "engine b8": "no ratio, 0.5 s/sample, float16",
        "engine b64": "oom"}
    assert s["odd"]["status"] == "ok" and s["odd"]["headline"]["error"].startswith(
        "reading the step's output: AttributeError: 'int' object has no attribute 'get'")
    assert s["next"]["status"] == "ok" and (work / "next.log").read_text() == "ran\n"


def test_packing_skips_a_file_gone_since_the_listing_and_survives_renames(tmp_path):
    import threading

    work = tmp_path / "work"
    work.mkdir()
    (work / "a.json").write_text("{}")
    (work / ".hidden.tmp").write_text("x")
    listed = [work / "a.json", work / "gone.json", work / ".hidden.tmp"]
    names = harvest.pack(work, tmp_path / "x.tar.gz", files=listed)
    assert names == ["a.json"]
    with tarfile.open(tmp_path / "x.tar.gz") as tar:
        assert tar.extractfile("a.json").read() == b"{}"
    stop = threading.Event()

    def churn():  # a bench rewriting its JSON atomically after every row, as fast as it can
        i = 0
        while not stop.is_set():
            (work / "b.json.tmp").write_text("y" * (i % 5000))
            os.replace(work / "b.json.tmp", work / "b.json")
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(200):
            harvest.pack(work, tmp_path / "y.tar.gz")
            with tarfile.open(tmp_path / "y.tar.gz") as tar:  # every archive whole and readable
                for m in tar.getmembers():
                    assert len(tar.extractfile(m).read()) == m.size
    finally:
        stop.set()
        t.join()


def test_a_step_that_ignores_sigint_is_killed_after_the_grace_period(tmp_path):
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('started')\n"
        "time.sleep(60)\n"
    )
    out = tmp_path / "out"
    res = run_harvest(
        out,
        "--steps-file",
        _steps_file(tmp_path, [{"name": "stubborn", "limit": 2, "cmd": [sys.executable, "-c", stubborn]}]),
        "--deadline",
        "30",
        "--min-step",
        "1",
        "--grace",
        "2",
        timeout=60,
    )
    assert res.returncode == 0
    step = json.loads((out / "summary.json").read_text())["steps"]["stubborn"]
    assert step["stopped_by"] == "killed after SIGINT" and step["rc"] == -9 and step["seconds"] < 8
    assert (tmp_path / "out" / "harvest.tar.gz").exists()
    # PYTHONUNBUFFERED: what a killed step printed is in its log (buffered, SIGKILL would lose it)
    assert "    started" in (tmp_path / "out" / "harvest.log").read_text()


def test_more_than_eight_files_in_out_fails_the_harvest(tmp_path):
    out = tmp_path / "out"
    litter = (
        f"import pathlib\nfor i in range(6): (pathlib.Path({str(out)!r}) / f'x{{i}}.log').write_text('x')\n"
    )
    res = run_harvest(
        out,
        "--steps-file",
        _steps_file(tmp_path, [{"name": "litter", "limit": 30, "cmd": [sys.executable, "-c", litter]}]),
        "--deadline",
        "60",
        timeout=60,
    )
    assert res.returncode != 0
    assert "harvest: $OUT holds 9 files, more than the 8 that come back" in res.stderr


def test_only_reruns_a_part_with_the_environment(tmp_path):
    steps = [
        {"name": "env", "limit": 30, "cmd": [sys.executable, "-c", "print('env')"]},
        {"name": "a", "limit": 30, "cmd": [sys.executable, "-c", "print('a')"]},
        {"name": "b", "limit": 30, "cmd": [sys.executable, "-c", "print('b')"]},
    ]
    out = tmp_path / "out"
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--only", "b", timeout=60)
    assert res.returncode == 0
    assert json.loads((out / "summary.json").read_text())["plan"] == ["env", "b"]
    bad = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--only", "c", timeout=60)
    assert bad.returncode == 1 and "harvest: unknown step(s) ['c']" in bad.stderr


def test_pytest_counts_from_junit_and_from_a_collection_log(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10">'
        "</testsuite></testsuites>"
    )
    assert harvest.pytest_counts(xml, tmp_path / "none.log") == {
        "passed": 4,
        "failed": 2,
        "errors": 1,
        "skipped": 3,
    }
    log = tmp_path / "c.log"
    log.write_text("a\n91/99 tests collected (8 deselected) in 0.04s\n")
    assert harvest.pytest_counts(tmp_path / "none.xml", log) == {"collected": 91}


BLOCKER = """
import sys
for name in ("open_clip", "webdataset", "ftfy"):  # absent as on the GPU machine: find_spec None
    sys.modules[name] = None
"""


def test_device_like_environment_collects_the_gpu_tests_and_runs_the_tiny_bench(tmp_path):
    """Without the packages the lent machine lacks (open_clip, webdataset, ftfy), the GPU tests still
    collect and the bench still runs: nothing on those paths imports them."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    check = subprocess.run(
        [sys.executable, "-c", "import webdataset"], env=env, capture_output=True, text=True
    )
    assert "ModuleNotFoundError: import of webdataset halted" in check.stderr  # the blocker works
    col = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--collect-only",
            "-m",
            "gpu",
            *harvest.GPU_TESTS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert col.returncode == 0, col.stdout[-2000:]
    assert harvest.pytest_counts(Path("-"), _write(tmp_path / "col.log", col.stdout))["collected"] >= 40
    args = "bench --preset tiny --batches 2 --steps 2 --feedback-every 2 --repeats 1 --json".split()
    bench = subprocess.run([sys.executable, "-m", "fgds_engine.cli", *args, str(tmp_path / "b.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert json.loads((tmp_path / "b.json").read_text())["complete"] is True


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _device_packages() -> dict[str, str | None]:
    out = {}
    for line in (ROOT / "benchmarks" / "device_packages.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name] = version or None
    return out


def test_prepared_wheels_are_pinned_to_the_tested_version_and_their_needs_are_on_the_device():
    from packaging.requirements import Requirement

    script = (ROOT / "benchmarks" / "prepare_wheels.sh").read_text()
    pins = dict(p.split("==") for p in re.search(r"WHEELS=\(([^)]*)\)", script).group(1).split())
    assert pins == {"diffusers": importlib.metadata.version("diffusers")}  # one pinned version, as tested
    device = _device_packages()
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    assert "diffusers" not in device and "torch" in device
    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "extra": "",
    }
    unused = {
        "importlib-metadata"
    }  # declared without a marker, imported only below Python 3.8 (proven below)
    for pkg in pins:
        for text in importlib.metadata.requires(pkg) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra
            name = norm(req.name)
            if name in unused:
                continue
            assert name in device or name in pins, f"{pkg} needs {req}: not on the device, not carried"
            if device.get(name):
                assert req.specifier.contains(device[name], prereleases=True), f"device {name} {device[name]}"
    code = (
        "import sys; sys.modules['importlib_metadata'] = None\n"
        "from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


def test_gpu_test_grid_is_bounded_in_triton_compiles():
    """Each case of test_ops_gpu is one kernel variant at most: prediction x form x dtype x size class."""
    import test_ops_gpu

    def size_class(shape):
        n = shape[1] * shape[2] * shape[3]
        return (n % 16 == 0, -(-n // 1024) == 1)

    variants = {(p, m, d, size_class(s)) for p, m, d, _, s in test_ops_gpu.CASES}
    assert len(test_ops_gpu.CASES) == 42 and len(variants) <= 20


def test_find_nvcc_looks_beyond_path(tmp_path, monkeypatch):
    cuda = tmp_path / "cuda-13.0" / "bin"
    cuda.mkdir(parents=True)
    (cuda / "nvcc").write_text("#!/bin/sh\n")
    (cuda / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(harvest, "NVCC_DIRS", (str(tmp_path / "cuda-*" / "bin"),))
    assert harvest.find_nvcc() == str(cuda / "nvcc")
    monkeypatch.setattr(harvest, "NVCC_DIRS", ())
    assert harvest.find_nvcc() is None


def test_a_bench_budget_follows_the_steps_actual_limit(tmp_path):
    """A step capped by the deadline below its own limit passes the smaller budget to --max-seconds."""
    echo = [sys.executable, "-c", "import sys; print(' '.join(sys.argv[1:]))", "--max-seconds", "175"]
    out = tmp_path / "out"
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, [{"name": "b", "limit": 200, "cmd": echo}]),
                      "--deadline", "100", "--reserve", "5", "--grace", "15", "--work", str(tmp_path / "w"),
                      timeout=60)
    assert res.returncode == 0
    flag, value = (tmp_path / "w" / "b.log").read_text().split()
    assert flag == "--max-seconds" and 50 <= int(value) <= 55  # 100 - 5 - 15 - 25, less the seconds spent
