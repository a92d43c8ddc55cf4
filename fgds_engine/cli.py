"""The ``fgds`` command."""

from __future__ import annotations

import argparse
import sys

from .criteria import CRITERIA


def _demo(args) -> int:
    from .demo import random_demo

    random_demo(args.out, per_row=args.per_row, steps=args.steps, criterion=args.criterion,
                feedback_scale=args.feedback_scale, seed=args.seed, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fgds", description="Fast feedback-guided data synthesis.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample with tiny random models and write a PNG grid",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--per-row", type=int, default=8, help="images per row (one row per variant)")
    demo.add_argument("--steps", type=int, default=20, help="DDIM steps")
    demo.add_argument("--criterion", choices=CRITERIA[:2], default="entropy", help="feedback criterion")
    demo.add_argument("--feedback-scale", type=float, default=0.05, help="feedback scale of the second row")
    demo.add_argument("--seed", type=int, default=0, help="run seed")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
