"""`fgds bench` (tiny preset on the CPU), the SD 1.5 configs, FLOP counting, gpu_check.sh dry run."""

import json
import os
import subprocess
from pathlib import Path

import torch

from fgds_engine.bench import count_flops, sd15_unet_config, sd15_vae_config
from fgds_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sd15_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # no memory: shapes only
        unet = UNet2DConditionModel(**sd15_unet_config(64))
        vae = AutoencoderKL(**sd15_vae_config(512))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_flop_counter_counts_forward_and_input_gradient():
    a, b = torch.randn(64, 32, requires_grad=True), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    assert count_flops(lambda: torch.autograd.grad((a @ b).sum(), a)) == 2 * (2 * 64 * 32 * 16)


def test_fgds_bench_tiny_preset(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--batches", "1", "3", "--steps", "3", "--feedback-every", "2",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["preset"] == "tiny" and result["device"].startswith("cpu") and "commit" in result
    run = result["runs"][0]
    assert run["feedback_every"] == 2 and run["feedback_steps"] == 2
    rows = {(r["impl"], r.get("batch")): r for r in run["rows"]}
    assert rows["reference (demo loop)", 1]["ratio"] == 1.0
    v100 = next(r for r in run["rows"] if r["impl"].startswith("paper Table 5"))
    assert v100["per_sample_s"] is None and "not retrievable" in v100["note"]  # never an invented number
    big = rows["engine", 3]
    assert big["per_sample_s"] > 0 and big["flops_per_sample"] > 0 and 0 < big["fraction_of_peak"]
    assert abs(sum(v for k, v in run["breakdown"].items() if not k.endswith("_s")) - 1) < 1e-9
    out = capsys.readouterr().out
    assert "unknown" in out and "reference (demo loop)" in out


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    planned = {k for k, v in summary["steps"].items() if v.get("status") == "planned"}
    assert {"gpu-tests", "triton-tests", "bench-step", "bench-sd15-256", "bench-sd15-512"} <= planned
    assert summary["steps"]["dry-bench-tiny"]["rc"] == "0"
    assert "bench-tiny-dry.json" in summary["results"]
    assert json.loads((tmp_path / "env.json").read_text())["torch"] == torch.__version__
