"""The write path of `fgds generate`: the share of wall time spent outside the sampler.

    python benchmarks/bench_generate.py [--jobs 256] [--batch-size 32] [--steps 30] [--format imagefolder]
    python benchmarks/bench_generate.py --simulate      # the write path held to a GPU's pace
    python benchmarks/bench_generate.py --simulate-upload   # the same, to an S3 server on 127.0.0.1 vs a disk

``--simulate`` replaces the sampler by one that returns fixed smooth images after sleeping a set time per
image (a sleep releases the GIL, as a GPU call does), at 256 and 512 px, and runs the real write path
(``generate_dataset``: encoding pool, atomic writes, manifest) for each image format and worker count: at
0 ms per image it measures the write path's own images per second, at 30 and 10 ms per image how much it
adds to the wall time (wall / sampler time - 1) and the share of the wall outside the sampler.

``--simulate-upload`` runs the same simulated sampler (30 ms per image, 256 px, PNG level 1) to a local
folder and to a moto S3 server started on 127.0.0.1 (``--upload``), interleaved, for both formats: what the
upload adds to the wall time. The server runs on the same CPU as the write path, so this is an upper bound
of what a real store's CPU costs the worker; a real store's latency and bandwidth are not modelled.

Builds a long-tailed ImageFolder of random images in a temporary folder, plans it and generates it with the
tiny-random preset, timing planning (scan + plan), the sampler calls (conditioning, denoising loop, decode,
final criterion) and everything else (exemplar loading, PNG encoding, atomic writes, manifest fsyncs).
Model construction is a one-time start-up cost and is reported apart. Writes JSON with the device and commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgds_engine.assemble import build_sampler, make_sample_fn
from fgds_engine.bench import commit, device_name, smooth_image, versions
from fgds_engine.config import ModelOptions
from fgds_engine.data import scan_imagefolder
from fgds_engine.plan import PlanOptions, make_plan, write_plan
from fgds_engine.production import GenerateOptions, generate_dataset
from fgds_engine.sampler import SamplerConfig


def make_data(root: Path, jobs: int, classes: int = 8) -> None:
    """Class c has 1 + c * k real images, with k chosen so the deficits add up to about ``jobs``."""
    rng = np.random.default_rng(0)
    k = max(1, round(2 * jobs / (classes * (classes - 1))))
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(1 + c * k):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


class SimulatedSampler:
    """A sampler at a set pace: fixed images after ``ms_per_image`` per image of sleep (which releases the
    GIL, as a GPU call does)."""

    def __init__(self, size: int, ms_per_image: float):
        self.images, self.pace = [smooth_image(size, i) for i in range(8)], ms_per_image / 1000

    def __call__(self, prompts, exemplars, labels, seeds):
        time.sleep(self.pace * len(seeds))
        n = len(seeds)
        return np.stack([self.images[s % 8] for s in seeds]), [0.0] * n, [False] * n


ENCODINGS = {"png-6": dict(image_format="png", png_level=6), "png-1": dict(image_format="png", png_level=1),
             "jpeg-95": dict(image_format="jpeg", quality=95),
             "webp-95": dict(image_format="webp", quality=95)}


def simulate(jobs: int, batch: int, sizes=(256, 512), paces_ms=(0, 30, 10), workers=(0, 1, 2)) -> list[dict]:
    """Rows of the simulated-GPU-pace grid (module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(data, jobs)
        plan = make_plan(scan_imagefolder(data), PlanOptions())
        for size, (name, enc), pace, w in itertools.product(sizes, ENCODINGS.items(), paces_ms, workers):
            sampler = SimulatedSampler(size, pace)
            out = Path(tmp) / f"out-{size}-{name}-{pace}-{w}"
            write_plan(plan, out)
            options = GenerateOptions(batch_size=batch, write_workers=w, **enc)
            r = generate_dataset(plan, out, sampler, options, {"bench": True}, progress=False)
            row = {"size": size, "encoding": name, "ms_per_image": pace, "write_workers": w,
                   "images": r.generated, "wall_s": r.wall_s, "sampler_s": r.sampler_s,
                   "images_per_s": r.generated / r.wall_s,
                   "bytes_per_image": len(options.encoding.encode(sampler.images[0])),
                   "outside_sampler_share": r.outside_sampler_share,
                   "added_to_wall": r.wall_s / r.sampler_s - 1 if pace else None}
            rows.append(row)
            shutil.rmtree(out)
            what = f"+{row['added_to_wall']:.1%} wall" if pace else "the write path alone"
            print(f"{size:4d} px {name:8s} {pace:3d} ms/img, {w} workers: {row['images_per_s']:7.1f} img/s, "
                  f"{what}")
    return rows


def _moto_server():
    """(process, endpoint) of ``python -m moto.server`` on a free loopback port."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5).close()
            break
        except OSError:
            time.sleep(0.1)
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    return proc, endpoint


def simulate_upload(jobs: int, batch: int, repeats: int = 2, pace_ms: float = 30, size: int = 256
                    ) -> list[dict]:
    """Rows: (format, local or upload, repeat) at a simulated pace, local and upload interleaved."""
    import s3fs

    proc, endpoint = _moto_server()
    rows = []
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            make_data(data, jobs)
            plan = make_plan(scan_imagefolder(data), PlanOptions())
            for rep, fmt, where in itertools.product(range(repeats), ("webdataset", "imagefolder"),
                                                     ("local", "upload")):
                out = Path(tmp) / f"out-{fmt}-{where}-{rep}"
                write_plan(plan, out)
                upload = {} if where == "local" else dict(
                    upload=f"s3://bench/{fmt}-{rep}", upload_options=json.dumps({"endpoint_url": endpoint}))
                extra = {"samples_per_shard": 128} if fmt == "webdataset" else {}
                options = GenerateOptions(batch_size=batch, format=fmt, image_format="png", png_level=1,
                                          **extra, **upload)
                r = generate_dataset(plan, out, SimulatedSampler(size, pace_ms), options, {"bench": True},
                                     progress=False)
                row = {"format": fmt, "where": where, "repeat": rep, "images": r.generated, "size": size,
                       "ms_per_image": pace_ms, "wall_s": r.wall_s, "sampler_s": r.sampler_s,
                       "added_to_wall": r.wall_s / r.sampler_s - 1}
                rows.append(row)
                shutil.rmtree(out)
                print(f"{fmt:12s} {where:6s} repeat {rep}: {r.generated} img, +{row['added_to_wall']:.1%}")
    finally:
        proc.kill()
        proc.wait()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=256, help="about this many synthetic images [256]")
    ap.add_argument("--batch-size", type=int, default=32, help="[32; 16 is what --simulate was run with]")
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (feedback every 5th) [30]")
    ap.add_argument("--format", choices=("imagefolder", "webdataset"), default="imagefolder")
    ap.add_argument("--simulate", action="store_true", help="the write path at a simulated GPU's pace")
    ap.add_argument("--simulate-upload", action="store_true", help="the same, to an S3 server on 127.0.0.1 "
                    "(moto) vs a local folder, interleaved")
    ap.add_argument("--json", default=None, help="output [benchmarks/results/bench_generate-<device>.json, "
                    "bench_generate-simulated-cpu.json with --simulate, bench_generate-upload-simulated-cpu"
                    ".json with --simulate-upload]")
    args = ap.parse_args(argv)
    if args.simulate or args.simulate_upload:
        if args.simulate_upload:
            rows, name = simulate_upload(args.jobs, args.batch_size), "bench_generate-upload-simulated-cpu"
            note = "sampler simulated by a sleep per image; the S3 server (moto) on the same CPU"
        else:
            rows, name = simulate(args.jobs, args.batch_size), "bench_generate-simulated-cpu"
            note = "sampler simulated by a sleep per image (releases the GIL, as a GPU call does)"
        path = Path(args.json or f"benchmarks/results/{name}.json")
        result = {"device": device_name(torch.device("cpu")), **versions(), "commit": commit(), "note": note,
                  "rows": rows}
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        make_data(data, args.jobs)
        t0 = time.perf_counter()
        plan = make_plan(scan_imagefolder(data), PlanOptions())
        write_plan(plan, out)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        models = ModelOptions(preset="tiny-random")
        config = SamplerConfig(num_inference_steps=args.steps)
        sampler, needs = build_sampler(models, config, len(plan.classes), log=lambda *a: None)
        build_s = time.perf_counter() - t0
        options = GenerateOptions(batch_size=args.batch_size, format=args.format)
        report = generate_dataset(plan, out, make_sample_fn(sampler, plan.data_root, needs, 0), options,
                                  {"bench": True}, progress=False)
    device = sampler.device
    outside = plan_s + report.wall_s - report.sampler_s
    share = outside / (plan_s + report.wall_s)
    result = {"device": device_name(device), **versions(), "commit": commit(), "jobs": len(plan.jobs),
              "batch_size": args.batch_size, "steps": args.steps, "format": args.format,
              "plan_s": plan_s, "generate_wall_s": report.wall_s, "sampler_s": report.sampler_s,
              "outside_sampler_s": outside, "outside_sampler_share": share, "model_build_s": build_s,
              "images_per_s": report.generated / report.wall_s}
    print(f"device: {result['device']}   {len(plan.jobs)} jobs, batch {args.batch_size}, {args.steps} steps, "
          f"{args.format}")
    print(f"plan {plan_s:.2f} s, generate {report.wall_s:.2f} s (sampler {report.sampler_s:.2f} s), "
          f"models {build_s:.2f} s (start-up, not counted)")
    print(f"outside the sampler: {outside:.2f} s = {share:.2%} of the wall time; "
          f"{result['images_per_s']:.1f} images/s")
    path = Path(args.json or f"benchmarks/results/bench_generate-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
