"""The CPU sizes of `fgds bench`: reference (batch 1) against the engine, in the same process.

    python benchmarks/bench_sampler.py [--sizes tiny small] [--steps 30] [--batches 1 8] [--repeats 3]

A thin wrapper over ``fgds_engine.bench`` (the library behind ``fgds bench``, which also has the sd15-256 /
sd15-512 presets for a GPU). Writes benchmarks/results/bench-<size>-<device>.json per size.
"""

from __future__ import annotations

import argparse

import torch

from fgds_engine.bench import main_bench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (feedback every 5th) [30]")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="engine batch sizes [1 8]")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row, fastest kept [3]")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for size in args.sizes:
        main_bench(size, batches=args.batches, steps=args.steps, feedback_every=[5], repeats=args.repeats,
                   device=device, dtype=None, attention="sdpa", channels_last=args.channels_last,
                   json_path=None)


if __name__ == "__main__":
    main()
