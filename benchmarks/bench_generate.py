"""The write path of `fgds generate`: the share of wall time spent outside the sampler.

    python benchmarks/bench_generate.py [--jobs 256] [--batch-size 32] [--steps 30] [--format imagefolder]

Builds a long-tailed ImageFolder of random images in a temporary folder, plans it and generates it with the
tiny-random preset, timing planning (scan + plan), the sampler calls (conditioning, denoising loop, decode,
final criterion) and everything else (exemplar loading, PNG encoding, atomic writes, manifest fsyncs).
Model construction is a one-time start-up cost and is reported apart. Writes JSON with the device and commit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import commit, device_name, versions
from PIL import Image

from fgds_engine.assemble import build_sampler, make_sample_fn
from fgds_engine.data import scan_imagefolder
from fgds_engine.options import ModelOptions
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=256, help="about this many synthetic images [256]")
    ap.add_argument("--batch-size", type=int, default=32, help="[32]")
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (feedback every 5th) [30]")
    ap.add_argument("--format", choices=("imagefolder", "webdataset"), default="imagefolder")
    ap.add_argument("--json", default=None, help="output [benchmarks/results/bench_generate-<device>.json]")
    args = ap.parse_args(argv)
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
