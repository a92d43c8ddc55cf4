"""The GPU harvest (benchmarks/gpu/driver.py behind gpu_check.sh), proven on the CPU: the 8-file limit of
$OUT, the overall deadline, the wheel install, the collection of the GPU tests, a device-like environment,
every step end to end at small sizes (the dry run; the real sizes under ``make dry-run``), and the GPU plan's
limits by arithmetic. No verdict here depends on the machine's speed: timeouts are safety nets."""

import importlib.metadata
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_NET, load_script

ROOT = Path(__file__).resolve().parents[1]
HARVEST = ROOT / "benchmarks" / "gpu" / "driver.py"
harvest = load_script("benchmarks/gpu/driver.py")


def run_harvest(out: Path, *args, timeout=SAFETY_NET, env=None, sigint_ignored=False):
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


def dry_run(tmp_path, size: str):
    """The harvest's dry run at ``size``, with a probe wheel; (summary, work folder, env.json)."""
    out, work = tmp_path / "out", tmp_path / "work"
    probe_wheel(tmp_path / "wheels")
    # a safety net for a hung step, not a verdict: a dry run is never cut by the GPU's limits
    res = run_harvest(out, "--dry-run", "--dry-size", size, "--work", str(work), "--wheels",
                      str(tmp_path / "wheels"), "--target", str(tmp_path / "site"), timeout=3 * SAFETY_NET)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out_files(out) == ["harvest.log", "harvest.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] is True and summary["dry_size"] == size and summary["finished"] is True
    assert summary["failed_steps"] == [], {n: s for n, s in steps.items() if s["status"] != "ok"}
    assert summary["deadline_s"] == 540 and summary["plan_check"]["problems"] == []  # the GPU's: arithmetic
    assert list(steps)[:2] == ["install-wheels", "env"]  # the environment is recorded after the install
    planned = {"bench-sd15-256-dpmpp", "bench-sd15-512", "bench-sd15-256-every1", "bench-micro"}
    assert {n for n, s in steps.items() if s["status"] == "planned"} == planned  # the GPU-only steps
    assert all(s["status"] == "ok" for n, s in steps.items() if n not in planned | {"build-cuda-lib"})
    assert steps["install-wheels"]["status"] == "ok"
    env = json.loads((work / "env.json").read_text())
    assert env["wheels_installed"] == ["fgds_probe-0.1.dist-info"] and env["torch"] == torch.__version__
    assert str(tmp_path / "site") in env["pythonpath"].split(os.pathsep)
    with tarfile.open(out / "harvest.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"env.json", "bench-sd15-256.json", "bench-sd15-256.log", "gpu-tests.log", "bench-step.json",
            "bench-sdxl-1024.json", "bench-flux-512.json", "summary.json", "harvest.log"} <= names
    return summary, work, env


def check_sd15_row(summary, work, preset):
    """The sd15 step's JSON: one feedback step at batch 1, engine against reference, guided and unguided, the
    memory lines of the three passes at batches 1 and 2, all in float32."""
    sd = json.loads((work / "bench-sd15-256.json").read_text())
    assert sd["preset"] == preset and sd["complete"] is True
    run = sd["runs"][0]
    assert run["feedback_steps"] == 1
    rows = {(r["impl"], r.get("batch")): r for r in run["rows"]}
    assert rows["reference (demo loop)", 1]["per_sample_s"] > 0
    assert rows["engine", 1]["ratio"] > 0 and rows["engine, no feedback (same CFG)", 1]["per_sample_s"] > 0
    assert {r["dtype"] for r in rows.values() if "dtype" in r} == {"float32"}
    lines = sd["memory_lines_gib"]
    assert lines["feedback"][1] > lines["cfg"][1] > 0 and lines["final"][1] > 0
    assert summary["steps"]["bench-sd15-256"]["headline"]["memory_lines_gib"] == lines
    return sd, lines


def check_sdxl_row(work, dtype):
    """The SDXL step on the tiny SDXL pipeline's UNet and VAE, the VAE in float32 whatever the run's dtype."""
    xl = json.loads((work / "bench-sdxl-1024.json").read_text())
    assert xl["preset"] == "sdxl-tiny" and xl["complete"] is True
    assert xl["dtype"] == (f"unet {dtype}, vae float32, classifier {dtype}" if dtype != "float32" else dtype)
    assert xl["memory_lines_gib"]["feedback"][1] > xl["memory_lines_gib"]["cfg"][1] > 0
    assert xl["auto_batch"]["batch"] > 0


def check_flux_row(work):
    """The Flux step on the tiny FLUX.1-dev-style models: its own flow scheduler, one feedback step against
    the reference, the memory lines of a guidance-distilled model (no unconditional half)."""
    fx = json.loads((work / "bench-flux-512.json").read_text())
    assert fx["preset"] == "flux-tiny" and fx["complete"] is True
    assert fx["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    rows = {(r["impl"], r.get("batch")): r for r in fx["runs"][0]["rows"]}
    assert rows["reference (demo loop)", 1]["per_sample_s"] > 0 and rows["engine", 1]["ratio"] > 0
    assert fx["memory_lines_gib"]["feedback"][1] > fx["memory_lines_gib"]["cfg"][1] > 0


def test_dry_run_same_plan_on_the_cpu(tmp_path):
    """Every step of the GPU plan runs to completion on the CPU at small sizes (or is said to be GPU-only):
    wheels into a temporary --target, nvcc found, GPU tests collected, the bench steps on the tiny presets
    with their JSON, headlines and memory lines, the fused-step benchmark; $OUT holds exactly three files; the
    GPU plan's limits pass their arithmetic. The real sizes: test_dry_run_at_the_real_size (make dry-run)."""
    summary, work, env = dry_run(tmp_path, "small")
    steps = summary["steps"]
    nvcc = steps["build-cuda-lib"]
    if harvest.find_nvcc():
        assert nvcc["status"] == "ok" and "release" in nvcc["headline"]["nvcc"]
    else:  # a missing compiler is a recorded failure, never a skip
        assert nvcc["status"] == "failed" and nvcc["note"].startswith("nvcc not found")
    assert steps["gpu-tests"]["headline"]["collected"] >= 40
    assert steps["triton-tests"]["headline"]["collected"] >= 100
    check_sd15_row(summary, work, "tiny")
    assert env["peft_tuners_utils"] == "imports" and env["diffusers_peft_backend"] is True  # as on the device
    assert list(steps)[-2:] == ["bench-sdxl-1024", "bench-flux-512"]  # SDXL, then Flux, last
    check_sdxl_row(work, "float32")
    check_flux_row(work)


@pytest.mark.slow
def test_dry_run_at_the_real_size(tmp_path):
    """``make dry-run``: sd15-256 with SD 1.5's published UNet and VAE (random weights), and the SDXL row in
    float16 (its VAE in float32). Minutes on a 2-core CPU, so not part of ``make test``."""
    summary, work, _ = dry_run(tmp_path, "real")
    sd, lines = check_sd15_row(summary, work, "sd15-256")
    # the price of feedback is measured there (seconds: no verdict on them here, only that it was computed)
    factor = sd["runs"][0]["feedback_cost_factor"]
    assert sd["unet_params_M"] > 859 and isinstance(factor, float) and math.isfinite(factor) and factor > 0
    assert lines["feedback"][1] > lines["final"][1] > lines["cfg"][1]  # the 512 px plan's input, scaled
    check_sdxl_row(work, "float16")


def test_the_gpu_plan_passes_its_arithmetic_and_a_broken_one_is_named():
    """The GPU limits checked without running anything: the plan as shipped fits (the correctness steps even
    when every step before them uses its whole limit); each kind of broken plan is named in one line."""
    a = harvest.parse_args(["--out", "x"])
    kw = dict(reserve=a.reserve, grace=a.grace, min_step=a.min_step)
    steps = harvest.gpu_plan("python", Path("w"))
    check = harvest.check_plan(steps, a.deadline, **kw)
    assert check["problems"] == [] and check["usable_s"] == 540 - 8 - 15
    assert [n for n, r in check["steps"].items() if r["fits_worst_case"]] == ["env", "build-cuda-lib",
                                                                              "gpu-tests"]
    assert check["steps"]["gpu-tests"]["worst_case_start_s"] == 90 + 150
    bench = lambda name, limit, must=False: harvest.Step(name, limit, ["x", "--max-seconds", "1"],  # noqa: E731
                                                        must_run=must, result=f"{name}.json")
    broken = [bench("a", 20), bench("b", 40), bench("c", 600), bench("c", 100, must=True)]
    assert harvest.check_plan(broken, 580, **kw)["problems"] == [
        "the deadline 580 s and 30 s of start-up exceed the 600 s one device command may run",
        "step name(s) used twice: ['c']",
        "result file(s) used twice: ['c.json']",
        "a: its limit 20 s is under --min-step 30 s: it never runs",
        "a: its limit 20 s leaves its bench under 10 s of --max-seconds",
        "c: its limit 600 s exceeds the 557 s the deadline leaves a step",
        "c: a correctness step, may start only at 660 s and not finish by 557 s",
    ]


def _steps_file(tmp_path, steps) -> str:
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(steps))
    return str(path)


def test_the_deadline_cuts_a_slow_step_and_the_summary_is_complete(tmp_path):
    """A step that would run for an hour is stopped with SIGINT at the deadline (its unbuffered output is
    kept), the next is skipped and said so. The verdict is the driver's record, never a stopwatch: the step's
    limit is what the deadline left it, and the subprocess timeout is only a safety net."""
    slow = (
        "import signal, sys, time\nprint('started', flush=False)\n"
        "try:\n    time.sleep(3600)\nexcept KeyboardInterrupt:\n    print('stopped cleanly'); sys.exit(3)\n"
    )
    steps = [
        {"name": "quick", "limit": 60, "cmd": [sys.executable, "-c", "print('quick done')"]},
        {"name": "slow", "limit": 3600, "cmd": [sys.executable, "-c", slow]},
        {"name": "after", "limit": 60, "cmd": [sys.executable, "-c", "print('never')"]},
    ]
    out = tmp_path / "out"
    # deadline 30 s: the slow step is given at most 30 - reserve 1 - grace 10 s, leaving it a 10 s grace
    args = "--deadline 30 --min-step 3 --reserve 1 --grace 10".split()
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), *args, "--work",
                      str(tmp_path / "work"), sigint_ignored=True)  # steps get SIGINT back
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    s = summary["steps"]
    assert summary["finished"] is True and summary["plan"] == ["quick", "slow", "after"]
    assert s["quick"]["status"] == "ok"
    assert s["slow"]["status"] == "timeout" and s["slow"]["stopped_by"] == "SIGINT at its limit"
    assert s["slow"]["limit_s"] <= 30 - 1 - 10  # what the deadline left it, not its own 3600 s
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
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--work", str(work))
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
        "time.sleep(3600)\n"
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
    )  # the verdict is how the step ended, not how long it took
    assert res.returncode == 0
    step = json.loads((out / "summary.json").read_text())["steps"]["stubborn"]
    assert step["stopped_by"] == "killed after SIGINT" and step["rc"] == -9 and step["limit_s"] == 2
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
    res = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--only", "b")
    assert res.returncode == 0
    assert json.loads((out / "summary.json").read_text())["plan"] == ["env", "b"]
    bad = run_harvest(out, "--steps-file", _steps_file(tmp_path, steps), "--only", "c")
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
    check = subprocess.run([sys.executable, "-c", "import webdataset"], env=env, capture_output=True,
                           text=True, timeout=SAFETY_NET)
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
        timeout=SAFETY_NET,
    )
    assert col.returncode == 0, col.stdout[-2000:]
    assert harvest.pytest_counts(Path("-"), _write(tmp_path / "col.log", col.stdout))["collected"] >= 40
    args = "bench --preset tiny --batches 2 --steps 2 --feedback-every 2 --repeats 1 --json".split()
    bench = subprocess.run([sys.executable, "-m", "fgds_engine.cli", *args, str(tmp_path / "b.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=SAFETY_NET)
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
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SAFETY_NET)
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
)
    assert res.returncode == 0
    flag, value = (tmp_path / "w" / "b.log").read_text().split()
    cap = json.loads((out / "summary.json").read_text())["steps"]["b"]["limit_s"]
    assert cap <= 100 - 5 - 15 and flag == "--max-seconds" and int(value) == cap - 25  # not its own 200 - 25
