"""The ``fgds`` command: demo, plan, generate, status, select, train, stats, bench.

Bad input (data, options, files, a configuration mismatch on resume, an unwritable output folder) is reported
on one line, ``fgds: error: ...``, with exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import options as opt
from .config import ClassifierOptions, ModelOptions, RuntimeOptions, SamplerConfig
from .data import check_apart
from .deprecation import moved_names
from .errors import InputError

__getattr__ = moved_names(__name__, {"option_tables": "fgds_engine.options",
                                     "GENERATE_DEFAULTS": "fgds_engine.options"})


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    if args.setting == "groups":
        cfg = (DemoConfig.quick(args.seed, "groups", color_prior=args.prior) if args.quick
               else DemoConfig.groups(args.seed, args.prior))
    else:
        if args.prior != "matched":
            raise InputError("--prior is an option of --setting groups")
        cfg = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    out = getattr(args, "out", "demo_out/groups" if args.setting == "groups" else "demo_out")
    run_demo(out, config=cfg, progress=not args.quiet)
    return 0


def _plan(args) -> int:
    from .data import load_class_names, scan_imagefolder
    from .plan import PlanOptions, make_plan, write_plan

    check_apart(DATA=args.data, OUT=args.out)
    toml = opt.read_toml(args.config)
    options = opt.build(PlanOptions, "plan", toml, args)
    _check_allocation(args, toml, options)
    scan = scan_imagefolder(args.data, verify=args.verify, progress=not args.quiet)
    names = load_class_names(args.class_names, scan.classes) if args.class_names else None
    plan = make_plan(scan, options, names, options.allocate and _class_errors(args, toml, scan, options))
    write_plan(plan, args.out)
    print(plan.table())
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} unreadable image(s), e.g. {scan.skipped[0][0]} "
              f"({scan.skipped[0][1]})")
    print(f"planned {len(plan.jobs)} synthetic images to reach {plan.target} per class; wrote "
          f"{Path(args.out) / 'plan.json'}")
    return 0


def _check_allocation(args, toml: dict, options) -> None:
    """The classifier's flags are for ``fgds plan --allocate errors``, which needs one: one line, before a
    scan."""
    given = sorted(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(ClassifierOptions)
                   if f.name in vars(args))
    if options.allocate is None and given:
        raise InputError(f"{', '.join(given)}: for --allocate errors (the classifier it measures)")
    if options.allocate and "--classifier" not in given and "classifier" not in toml.get("classifier", {}):
        raise InputError("--allocate errors needs --classifier: the budget follows its errors on --val")


def _class_errors(args, toml: dict, scan, options) -> dict[str, float]:
    """``fgds plan --allocate errors``: the classifier's error per class on --val (docs/production.md)."""
    from .data import scan_imagefolder
    from .train import class_errors, folder_dataset, image_transform

    if (val := scan_imagefolder(options.val, verify=False)).classes != scan.classes:
        raise InputError(f"--val {options.val} has the classes {val.classes}, DATA {scan.classes}: a "
                         "validation split of the same classes")
    model, clf = _classifier_for(args, toml, scan.classes)
    val = folder_dataset(options.val, scan.classes, image_transform(clf.image_size))
    return class_errors(model, val, scan.classes)


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


def sampler_options(toml: dict, args) -> tuple[SamplerConfig, RuntimeOptions]:
    """``SamplerConfig`` from the [sampler] table and ``RuntimeOptions`` from [runtime], then the flags. A
    [sampler] table written before the split may hold runtime keys (dtype, backend, ...): they are taken
    from there, unless [runtime] gives the same key too (one line saying where it belongs)."""
    sampler = dict(toml.get("sampler", {}))
    runtime_names = {f.name for f in dataclasses.fields(RuntimeOptions)}
    moved = {k: sampler.pop(k) for k in list(sampler) if k in runtime_names}
    runtime = dict(toml.get("runtime", {}))
    both = sorted(set(moved) & set(runtime))
    if both:
        raise InputError(f"{', '.join(both)} given in [sampler] and in [runtime] of the config file: "
                         "it belongs in [runtime] only")
    toml = {**toml, "sampler": sampler, "runtime": {**moved, **runtime}}
    return (opt.build(SamplerConfig, "sampler", toml, args),
            opt.build(RuntimeOptions, "runtime", toml, args, opt.GENERATE_DEFAULTS))


def _add_options(p, command: str) -> None:
    for _, _, cls, defaults in opt.option_tables(command):
        opt.add_dataclass_options(p, cls, defaults)


def _generate(args) -> int:
    import torch

    from .assemble import (
        auto_batch,
        build_sampler,
        check_noise_level,
        make_sample_fn,
        production_call_options,
    )
    from .plan import read_plan
    from .production import (
        GenerateOptions,
        PartLease,
        Worker,
        generate_dataset,
        open_store,
        run_configuration,
    )
    from .production.store import pull_run_files

    toml = opt.read_toml(args.config)
    sampler_cfg, runtime = sampler_options(toml, args)
    gen = opt.build(GenerateOptions, "generate", toml, args)
    models = opt.build(ModelOptions, "models", toml, args)
    if "://" in args.out:
        raise InputError(f"OUT is the local folder `fgds plan` wrote (or an empty staging folder); give the "
                         f"store as --upload {args.out}")
    rank, world = _distributed()
    worker = Worker(gen.shard[0], gen.shard[1], rank, world)
    store = None
    if gen.upload:  # checked before anything loads; a fresh node takes plan.json and run.json from it
        store = open_store(gen, worker)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        pull_run_files(store, Path(args.out), worker.tag)
    plan = read_plan(args.out)
    if models.threads:
        torch.set_num_threads(models.threads)
    say = print if rank == 0 else (lambda *a, **k: None)
    with PartLease.acquire(args.out, worker) as lease:  # before the models load: a twin is refused at once
        sampler, needs_exemplars = build_sampler(models, sampler_cfg, len(plan.classes), runtime=runtime,
                                                 log=say, progress=not args.quiet)
        check_noise_level(sampler, gen.noise_level)
        call_options = production_call_options(sampler, models.pipe_options)
        if gen.batch_size == "auto":
            gen, runtime = auto_batch(sampler, gen, runtime, args.out, say)
        sample_fn = make_sample_fn(sampler, plan.data_root, needs_exemplars, gen.noise_level, call_options)
        run_config = run_configuration(sampler, sampler_cfg, runtime, models)
        report = generate_dataset(plan, args.out, sample_fn, gen, run_config, worker=worker,
                                  progress=not args.quiet, lease=lease, store=store)
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
    from .production import status, status_table

    print(status_table(status(plan, out), plan.errors))
    return 0


def _select(args) -> int:
    from .plan import read_plan
    from .production.select import SelectOptions, select_dataset

    options = opt.build(SelectOptions, "select", {}, args)
    to = Path(args.to or f"{str(args.out).rstrip('/')}-selected")
    check_apart(OUT=args.out, **{"--to": to})
    kept = select_dataset(read_plan(args.out), args.out, to, options)
    print(f"kept {sum(kept.values())} sample(s) of {len(kept)} class(es) by {options.by} in {to} (an "
          f"ImageFolder: fgds train --synthetic {to}); {to / 'selection.json'} lists them")
    return 0


def _classifier_for(args, toml: dict, classes):
    """(classifier on its device, ClassifierOptions) from the flags and the [classifier] table."""
    from .assemble import load_classifier, pick_device

    clf = opt.build(ClassifierOptions, "classifier", toml, args)
    return load_classifier(clf, len(classes)).to(pick_device(clf)), clf


def _train(args) -> int:
    import torch

    from .data import scan_imagefolder
    from .production.remote import local_images
    from .train import (
        TrainConfig,
        evaluate,
        folder_dataset,
        format_table,
        image_transform,
        predict,
        save_metrics,
        train_classifier,
    )

    # a run in an object store: its finished samples, fetched into a local ImageFolder (production/remote.py)
    given = args.synthetic
    args.synthetic = local_images(given, args.cache, args.store_options, progress=not args.quiet)
    check_apart(**{"--real": args.real, "--synthetic": given if args.synthetic == given else None,
                   "--test": args.test, "--out": args.out})
    toml = opt.read_toml(args.config)
    cfg = opt.build(TrainConfig, "train", toml, args)
    scan = scan_imagefolder(args.real, verify=False)
    model, clf = _classifier_for(args, toml, scan.classes)
    tf = image_transform(clf.image_size)
    real = folder_dataset(args.real, scan.classes, tf)
    synth = folder_dataset(args.synthetic, scan.classes, tf, required=False) if args.synthetic else None
    test = folder_dataset(args.test, scan.classes, tf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = train_classifier(model, real, real.labels, synth, synth.labels if synth else None, config=cfg,
                               num_classes=len(scan.classes), checkpoint=out / "checkpoint.pt",
                               progress=not args.quiet)
    preds = predict(model, torch.stack([test[i][0] for i in range(len(test))]))
    groups = None
    if args.test_groups:
        mapping = json.loads(Path(args.test_groups).read_text())
        groups = torch.tensor([int(mapping[str(p.relative_to(args.test))]) for p in test.paths])
    metrics = evaluate(preds, torch.tensor(test.labels), [scan.counts()[c] for c in scan.classes],
                       groups=groups)
    print(format_table({"test": metrics}))
    if "worst_group" in metrics:
        print(f"worst-group accuracy: {100 * metrics['worst_group']:.1f} (group {metrics['worst_group_id']})")
    save_metrics(out / "metrics.json", {"config": opt.to_dict(cfg), "history": history, "test": metrics,
                                        "classes": scan.classes, "synthetic": len(synth) if synth else 0})
    torch.save(model.state_dict(), out / "classifier.pt")
    print(f"wrote {out / 'metrics.json'} and {out / 'classifier.pt'}")
    return 0


def _stats(args) -> int:
    from .class_stats import StreamingStatsFit
    from .data import scan_imagefolder
    from .train import folder_dataset, image_transform, iter_features

    scan = scan_imagefolder(args.data, verify=False)
    model, clf = _classifier_for(args, {}, scan.classes)
    data = folder_dataset(args.data, scan.classes, image_transform(clf.image_size))
    fit = None
    for feats, labels in iter_features(model, data, batch_size=args.batch_size, progress=not args.quiet):
        fit = fit or StreamingStatsFit(len(scan.classes), feats.shape[1], rank_cap=args.rank_cap)
        fit.add(feats, labels)
    try:
        stats = fit.finish()
    except ValueError as e:  # a class folder without a readable image
        raise InputError(str(e)) from None
    stats.save(args.out)
    print(f"fitted class-conditional Gaussians on {int(stats.counts.sum())} images ({stats.dim}-d features, "
          f"{stats.num_classes} classes; {stats.capped} class(es) past the rank cap {args.rank_cap}); "
          f"{stats.stored_bytes() / 2**20:.1f} MiB; wrote {args.out}")
    return 0


def _bench(args) -> int:
    import torch

    from .bench import BenchOptions, main_bench

    o = opt.build(BenchOptions, "bench", {}, args)
    device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = o.dtype or ("float16" if device.startswith("cuda") else None)
    try:
        main_bench(o.preset, batches=o.batches, steps=o.steps, feedback_every=o.feedback_every,
                   repeats=o.repeats, warmup=o.warmup, device=device, dtype=dtype, attention=o.attention,
                   channels_last=o.channels_last, json_path=o.json, max_seconds=o.max_seconds,
                   probe_memory=o.probe_memory, scheduler=o.scheduler)
    except KeyboardInterrupt:
        return 130
    return 0


def _status(args) -> int:
    from .plan import read_plan
    from .production import preview_sheet
    from .production.remote import read_location

    store, folder = read_location(args.out, args.cache, args.store_options, "OUT")
    plan = read_plan(folder)
    code = _print_status(plan, folder)
    if args.preview:
        w, h = preview_sheet(plan, folder, args.preview, per_class=args.per_class, store=store)
        print(f"wrote {args.preview} ({w}x{h}: up to {args.per_class} samples per class)")
    return code


def _demo_parser(sub, options: bool = True):
    p = sub.add_parser("demo", help="the embedded end-to-end demos on scikit-learn's digits (no downloads)",
                       description="Train a pixel-space diffusion model on all non-test scikit-learn digits "
                       "and a classifier on a biased subset, synthesize without and with feedback (loss, "
                       "entropy, hardness), retrain, and print test accuracy. --setting long-tail: a "
                       "long-tailed classifier set, accuracy per shot group. --setting groups: colored "
                       "digits, "
                       "classes balanced but each digit's color 90% one color (a group = digit x color), "
                       "worst-group and minority-group accuracy, the stroke colors of the samples and the "
                       "seconds per image of each variant.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setting", choices=("long-tail", "groups"), default="long-tail", help="which demo")
    p.add_argument("--prior", choices=("matched", "milder"), default="matched",
                   help="groups: the generator's color prior, matched (90%% majority, as the classifier's "
                   "data) or milder (55%%)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="output folder, trained models cached in "
                   "OUT/cache (default: demo_out, demo_out/groups for --setting groups)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the models and the samples")
    p.add_argument("--quick", action="store_true", help="a one-minute run with tiny budgets (tests, CI)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _plan_parser(sub, options: bool = True):

    p = sub.add_parser("plan", help="scan a long-tailed ImageFolder, plan the synthetic images per class",
                       description="Count the real images per class (DATA/<class>/*.jpg|png|...), compute "
                       "each class's deficit to a uniform target and write OUT/plan.json (the table "
                       "every job is computed from).")
    p.add_argument("data", help="the real ImageFolder: one sub-folder of images per class")
    p.add_argument("out", help="output folder of the synthetic dataset (the plan is written there)")
    p.add_argument("--class-names", help="JSON {folder: name} or 'folder name' lines, for the prompts "
                   "[default: the folder names]")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not decode every image to skip unreadable ones [default: verify]")
    p.add_argument("--config", help="TOML file; its [plan] table sets the options below")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if options:
        _add_options(p, "plan")
    p.set_defaults(func=_plan)


def _generate_parser(sub, options: bool = True):

    p = sub.add_parser("generate", help="generate the planned images (resumable, sharded, multi-process)",
                       description="Run the plan in OUT through the feedback-guided sampler and write "
                       "OUT/<class>/<job>.png (or WebDataset tars) with a JSONL manifest. Resumes by "
                       "default; under torchrun each process takes its share.")
    p.add_argument("out", help="the folder `fgds plan` wrote")
    p.add_argument("--config", help="TOML file with [generate], [sampler], [runtime] and [models] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if options:
        _add_options(p, "generate")
    p.set_defaults(func=_generate)


def _status_parser(sub, options: bool = True):
    p = sub.add_parser("status", help="done / pending / failed per class, over every manifest part")
    p.add_argument("out", help="the output folder of a plan, or the --upload URL of a run")
    p.add_argument("--preview", metavar="SHEET.png", help="also write a contact sheet: a row per class with "
                   "its first samples, labelled with done / planned and failures")
    p.add_argument("--per-class", type=opt.positive_int, default=8,
                   help="samples per class on the sheet [default: 8]")
    _store_flags(p, "OUT")
    p.set_defaults(func=_status)


def _store_flags(p, what: str) -> None:
    p.add_argument("--store-options", metavar="JSON", help=f"when {what} is a URL: the store backend's "
                   "arguments as a JSON object, e.g. endpoint_url (credentials only from its environment)")
    p.add_argument("--cache", metavar="DIR", help=f"when {what} is a URL: the local copy of its plan and "
                   "journal (and images, for train) [default: ~/.cache/fgds/runs/<hash of the URL>]")


def _select_parser(sub, options: bool = True):
    p = sub.add_parser("select", help="keep N samples per class of an oversampled run (generate, select)",
                       description="Rank each class's finished samples by the criterion the run recorded "
                       "(highest first), at random, or a mix, and write the kept ones as an ImageFolder "
                       "(links to the run's images; files taken out of WebDataset tars) with selection.json. "
                       "Writing it again completes a killed selection.")
    p.add_argument("out", help="the run's folder (fgds plan --oversample K, then fgds generate)")
    p.add_argument("--to", metavar="DIR", help="the selected ImageFolder [default: OUT-selected]")
    if options:
        _add_options(p, "select")
    p.set_defaults(func=_select)


def _train_parser(sub, options: bool = True):

    p = sub.add_parser("train", help="train a classifier on real (+ synthetic) images; accuracy per group",
                       description="Balanced Softmax; with --synthetic, every batch is half real, half "
                       "synthetic (class-balanced); checkpoint after every epoch in OUT (resumes); test "
                       "accuracy overall and for many (>100), medium (20-100), few (<20) shot classes.")
    p.add_argument("--real", required=True, help="the real (long-tailed) ImageFolder")
    p.add_argument("--synthetic", help="the synthetic ImageFolder `fgds generate` wrote (classes by name), "
                   "or the --upload URL of a run (its images are fetched into --cache)")
    p.add_argument("--test", required=True, help="the balanced test ImageFolder (same class folders)")
    p.add_argument("--test-groups", help="JSON {class/file: group id} for worst-group accuracy")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, classifier.pt, metrics.json")
    p.add_argument("--config", help="TOML file; its [train] and [classifier] tables set the options below")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _store_flags(p, "--synthetic")
    if options:
        _add_options(p, "train")
    p.set_defaults(func=_train)


def _stats_parser(sub, options: bool = True):
    p = sub.add_parser("stats", help="fit the hardness criterion's class Gaussians on real images",
                       description="Extract the classifier's penultimate features over the real training "
                       "ImageFolder and save the class Gaussians of the hardness criterion, streamed in a "
                       "low-rank form (for --criterion hardness --stats FILE).")
    p.add_argument("data", help="the real training ImageFolder")
    p.add_argument("--out", required=True, help="statistics file to write")
    p.add_argument("--batch-size", type=opt.positive_int, default=64,
                   help="images per feature batch [default: 64]")
    p.add_argument("--rank-cap", type=opt.positive_int, default=1280,
                   help="directions kept per class covariance (the "
                   "rest is folded into its isotropic part; fgds_engine/class_stats.py) [default: 1280]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if options:
        _add_options(p, "stats")
    p.set_defaults(func=_stats)


def _bench_parser(sub, options: bool = True):

    p = sub.add_parser("bench", help="reference vs engine per-sample throughput (random-weight presets)",
                       description="Time reference.sample_one (batch 1) against the engine at each batch "
                       "size, guided and unguided, for feedback every k steps; report samples/s, the ratio, "
                       "the price of feedback, a breakdown, FLOPs per sample and the fraction of the "
                       "measured matmul peak. sd15-* need a GPU in practice.")
    if options:
        _add_options(p, "bench")
    p.set_defaults(func=_bench)


SUBCOMMANDS = {"demo": _demo_parser, "plan": _plan_parser, "generate": _generate_parser,
               "status": _status_parser, "select": _select_parser, "train": _train_parser,
               "stats": _stats_parser, "bench": _bench_parser}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``fgds`` parser: one small function per subcommand. With ``command`` (the one about to run),
    only its own option tables are read: the others' import the engine (torch), which ``fgds status`` and
    ``fgds plan`` do not need."""
    ap = argparse.ArgumentParser(prog="fgds", description="Fast feedback-guided data synthesis.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, add in SUBCOMMANDS.items():
        add(sub, options=command is None or name == command)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
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
