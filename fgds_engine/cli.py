"""The ``fgds`` command: demo, plan, generate, status.

Bad input (data, options, files, a configuration mismatch on resume, an unwritable output folder) is reported
on one line, ``fgds: error: ...``, with exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import options as opt
from .config import SamplerConfig
from .criteria import CRITERIA
from .data import InputError


def _demo(args) -> int:
    from .demo import random_demo

    random_demo(args.out, per_row=args.per_row, steps=args.steps, criterion=args.criterion,
                feedback_scale=args.feedback_scale, seed=args.seed, progress=not args.quiet)
    return 0


def _plan(args) -> int:
    from .data import load_class_names, scan_imagefolder
    from .plan import PlanOptions, make_plan, write_plan

    toml = opt.read_toml(args.config)
    options = opt.build(PlanOptions, "plan", toml, args)
    scan = scan_imagefolder(args.data, verify=args.verify, progress=not args.quiet)
    names = load_class_names(args.class_names, scan.classes) if args.class_names else None
    plan = make_plan(scan, options, names)
    write_plan(plan, args.out)
    print(plan.table())
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} unreadable image(s), e.g. {scan.skipped[0][0]} "
              f"({scan.skipped[0][1]})")
    print(f"planned {len(plan.jobs)} synthetic images to reach {plan.target} per class; wrote "
          f"{Path(args.out) / 'plan.json'} and jobs.jsonl")
    return 0


def _distributed():
    """(rank, world) from torchrun's environment; a gloo / nccl process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def _generate(args) -> int:
    import torch

    from .assemble import build_sampler, make_sample_fn
    from .plan import read_plan
    from .production import GenerateOptions, Worker, generate_dataset

    toml = opt.read_toml(args.config)
    sampler_cfg = opt.build(SamplerConfig, "sampler", toml, args)
    gen = opt.build(GenerateOptions, "generate", toml, args)
    models = opt.build(opt.ModelOptions, "models", toml, args)
    plan = read_plan(args.out)
    if models.threads:
        torch.set_num_threads(models.threads)
    rank, world = _distributed()
    worker = Worker(gen.shard[0], gen.shard[1], rank, world)
    say = print if rank == 0 else (lambda *a, **k: None)
    sampler, needs_exemplars = build_sampler(models, sampler_cfg, len(plan.classes), log=say)
    sample_fn = make_sample_fn(sampler, plan.data_root, needs_exemplars, gen.noise_level)
    run_config = {"sampler": opt.to_dict(sampler_cfg), "models": opt.to_dict(models) | {"device": None,
                                                                                         "threads": None}}
    report = generate_dataset(plan, args.out, sample_fn, gen, run_config, worker=worker,
                              progress=not args.quiet)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    line = (f"worker {worker.index}/{worker.count}: {report.generated} image(s) generated, "
            f"{report.done_before} already done, {report.failed} failed, {report.retries} retries; "
            f"{report.wall_s:.1f} s, {report.outside_sampler_share:.1%} of it outside the sampler")
    print(line)
    if report.stopped_by is not None:
        name = signal.Signals(report.stopped_by).name
        print(f"stopped by {name} after finishing its batch; the manifest is flushed. Resume with the same "
              f"command: finished images are kept and skipped.", file=sys.stderr)
        return 128 + report.stopped_by
    if rank == 0 and world == 1 and gen.shard == (0, 1):
        return _print_status(plan, args.out)
    return 0


def _print_status(plan, out) -> int:
    from .production import status

    table = status(plan, out)
    w = max(12, *(len(c) for c in table))
    print(f"{'class':{w}} {'planned':>8} {'done':>8} {'failed':>8} {'pending':>8}")
    totals = dict.fromkeys(("planned", "done", "failed", "pending"), 0)
    for c, row in table.items():
        print(f"{c:{w}} {row['planned']:8d} {row['done']:8d} {row['failed']:8d} {row['pending']:8d}")
        for k in totals:
            totals[k] += row[k]
    print(f"{'total':{w}} {totals['planned']:8d} {totals['done']:8d} {totals['failed']:8d} "
          f"{totals['pending']:8d}")
    return 0


def _status(args) -> int:
    from .plan import read_plan

    return _print_status(read_plan(args.out), args.out)


def build_parser() -> argparse.ArgumentParser:
    from .plan import PlanOptions
    from .production import GenerateOptions

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

    plan = sub.add_parser("plan", help="scan a long-tailed ImageFolder, plan the synthetic images per class",
                          description="Count the real images per class (DATA/<class>/*.jpg|png|...), compute "
                          "each class's deficit to a uniform target and write OUT/plan.json and "
                          "OUT/jobs.jsonl.")
    plan.add_argument("data", help="the real ImageFolder: one sub-folder of images per class")
    plan.add_argument("out", help="output folder of the synthetic dataset (the plan is written there)")
    plan.add_argument("--class-names", help="JSON {folder: name} or 'folder name' lines, for the prompts "
                      "[default: the folder names]")
    plan.add_argument("--no-verify", dest="verify", action="store_false",
                      help="do not decode every image to skip unreadable ones [default: verify]")
    plan.add_argument("--config", help="TOML file; its [plan] table sets the options below")
    plan.add_argument("--quiet", action="store_true", help="no progress bar")
    opt.add_dataclass_options(plan, PlanOptions)
    plan.set_defaults(func=_plan)

    gen = sub.add_parser("generate", help="generate the planned images (resumable, sharded, multi-process)",
                         description="Run the plan in OUT through the feedback-guided sampler and write "
                         "OUT/<class>/<job>.png (or WebDataset tars) with a JSONL manifest. Resumes by "
                         "default; under torchrun each process takes its share.")
    gen.add_argument("out", help="the folder `fgds plan` wrote")
    gen.add_argument("--config", help="TOML file with [generate], [sampler] and [models] tables")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    opt.add_dataclass_options(gen, GenerateOptions)
    opt.add_dataclass_options(gen, opt.ModelOptions)
    opt.add_dataclass_options(gen, SamplerConfig)
    gen.set_defaults(func=_generate)

    st = sub.add_parser("status", help="done / pending / failed per class, over every manifest part")
    st.add_argument("out", help="the output folder of a plan")
    st.set_defaults(func=_status)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fgds: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (InputError, FileNotFoundError) as e:
        print(f"fgds: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from .models import UnsafeCheckpointError

        if isinstance(e, UnsafeCheckpointError):
            print(f"fgds: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
