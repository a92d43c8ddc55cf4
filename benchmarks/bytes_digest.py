"""The bytes the engine produces, as digests: run before and after a change that must not change them.

    python benchmarks/bytes_digest.py before.json [--demos]     # at the old commit (a worktree on PYTHONPATH)
    python benchmarks/bytes_digest.py after.json [--demos]      # at the new one; then compare the two files

Rows (tiny random models, CPU, one thread): every DDPM-family scheduler on the tiny SD pipeline, feedback off
and on; every pipeline family under its own scheduler, off and on (SD, SD 2 v-prediction, unCLIP, SDXL, SD3,
Flux, FLUX.1-dev, PixArt-Sigma, Sana) and the flow schedulers on SD3 and Sana; the guidance options and terms
(criteria, shift / score, the x0 path, eta, interval CFG, CADS, repulsion, a feedback window); every file of
``fgds plan`` + ``fgds generate --preset tiny-random`` as ImageFolder and WebDataset (plan.json names its
data folder, a temporary one: it differs between any two runs); with ``--demos``, both quick demos' sample
grids, accuracy chart and metrics less their timings. Each row is the first 16 hex digits of a SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgds_engine.models import tiny_classifier, tiny_flow_pipeline, tiny_pipeline
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
from fgds_engine.solvers import FLOW_SCHEDULER_NAMES, SCHEDULERS

PROMPTS, LABELS, SEEDS = ["a red cat", "a small dog"], [1, 4], [21, 22]
OPTIONS = {"crit=loss": dict(criterion="loss"), "crit=entropy": dict(criterion="entropy"),
           "shift": dict(feedback_mode="shift", scheduler="ddim"),
           "score": dict(feedback_mode="score", scheduler="ddim"), "x0": dict(grad_path="x0"),
           "eta": dict(eta=0.5), "cfg_interval": dict(cfg_interval=(0.5, 3.0)), "cads": dict(cads=(0.3, 0.8)),
           "repulsion": dict(repulsion_scale=0.05), "window": dict(feedback_window=(1, 4))}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def sampled(pipe, kind: str, classifier, exemplars, **config) -> str:
    config = {"num_inference_steps": 6, "feedback_every": 2, "embedding_dropout": 0.0, **config}
    sampler = FeedbackGuidedSampler.from_pipe(pipe, classifier=classifier, config=SamplerConfig(**config))
    binning = {"use_resolution_binning": False} if kind in ("pixart", "sana") else {}  # tiny: no bins
    out = sampler.generate(PROMPTS, exemplars if kind == "unclip" else None, labels=LABELS, seeds=SEEDS,
                           output_type="pt", **binning)
    return digest(out.images.detach().contiguous().float().numpy().tobytes())


def engine_rows(rng) -> dict:
    rows, classifier = {}, tiny_classifier(10, seed=0)
    exemplars = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in PROMPTS]
    for kind in ("sd", "sd2", "unclip", "sdxl"):
        pipe = tiny_pipeline(kind)
        for fb in (0.0, 0.03):
            rows[f"{kind} own fb={fb}"] = sampled(pipe, kind, classifier, exemplars, feedback_scale=fb)
        if kind != "sd":
            continue
        for name in (n for n in SCHEDULERS if n not in FLOW_SCHEDULER_NAMES):
            for fb in (0.0, 0.03):
                rows[f"sd {name} fb={fb}"] = sampled(pipe, kind, classifier, exemplars, scheduler=name,
                                                     feedback_scale=fb)
        for name, options in OPTIONS.items():
            rows[f"sd {name}"] = sampled(pipe, kind, classifier, exemplars, **options)
    for kind in ("sd3", "flux", "flux-dev", "pixart", "sana"):
        pipe = tiny_flow_pipeline(kind)
        size = dict(image_size=32 if kind == "sana" else 16, classifier_size=16)
        for fb in (0.0, 0.03):
            rows[f"{kind} own fb={fb}"] = sampled(pipe, kind, classifier, exemplars, feedback_scale=fb,
                                                  **size)
        if kind in ("sd3", "sana"):
            for name in FLOW_SCHEDULER_NAMES:
                rows[f"{kind} {name} fb=0.03"] = sampled(pipe, kind, classifier, exemplars, scheduler=name,
                                                         feedback_scale=0.03, **size)
    return rows


def production_rows(rng, tmp: Path) -> dict:
    rows, fgds = {}, [sys.executable, "-m", "fgds_engine.cli"]
    for c, n in (("cat", 5), ("dog", 2), ("owl", 1)):
        (tmp / "data" / c).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "data" / c / f"{i}.png")
    subprocess.run([*fgds, "plan", str(tmp / "data"), str(tmp / "out"), "--quiet"], check=True,
                   capture_output=True)
    for fmt in ("imagefolder", "webdataset"):
        out = tmp / f"out-{fmt}"
        subprocess.run(["cp", "-r", str(tmp / "out"), str(out)], check=True)
        subprocess.run([*fgds, "generate", str(out), "--preset", "tiny-random", "--quiet", "--batch-size",
                        "2", "--format", fmt, "--num-inference-steps", "6"], check=True, capture_output=True)
        rows |= {f"generate {fmt} {p.relative_to(out)}": digest(p.read_bytes())
                 for p in sorted(out.rglob("*")) if p.is_file()}
    return rows


def demo_rows(tmp: Path) -> dict:
    rows = {}
    for setting in ("long-tail", "groups"):
        out = tmp / setting
        subprocess.run([sys.executable, "-m", "fgds_engine.cli", "demo", "--quick", "--setting", setting,
                        "--out", str(out), "--quiet"], check=True, capture_output=True)
        metrics = json.loads((out / "metrics.json").read_text())
        samples = {n: {k: v for k, v in d.items() if "seconds" not in k and "time_vs" not in k}
                   for n, d in metrics["samples"].items()}  # less the timings
        rows[f"demo {setting} samples"] = digest(json.dumps(samples, sort_keys=True).encode())
        rows |= {f"demo {setting} {p.name}": digest(p.read_bytes()) for p in sorted(out.glob("*.png"))}
    return rows


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = engine_rows(rng)
    with tempfile.TemporaryDirectory() as tmp:
        rows |= production_rows(rng, Path(tmp))
    if "--demos" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            rows |= demo_rows(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"{len(rows)} rows in {sys.argv[1]}")


if __name__ == "__main__":
    main()
