"""Why the other schedulers' digits are worse: DDIM's x0 clipping (a diagnostic, run after the grid).

    python benchmarks/experiments/clipping.py [--out demo_out/schedulers] [--seeds 0 1 2] [--n 300]

Not part of the grid fixed before looking (experiments/schedulers.py): that grid showed every non-DDIM
scheduler far below DDIM 25 in the long-tail demo's fidelity. The demo's generator config is a DDIMScheduler
with ``clip_sample=True`` (x0 clamped to [-1, 1] at every step); DPM-Solver++, UniPC and Euler have no such
option, and a 800-step pixel-space model leans on it. This measures the oracle's fidelity of unguided
samples (CFG 1.5, the same ``n`` jobs per seed) for DDIM 25 with and without the clipping, DPM-Solver++ 2M
10 without and with dynamic thresholding (its range control, ``sample_max_value=1``), and Euler 20, on the
long-tail generators and oracles the grid cached under --out.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fgds_engine.conditioning import Conditioning
from fgds_engine.demo import NUM_CLASSES, Cache, DemoConfig, SmallCNN, load_digits16, make_generator, split
from fgds_engine.demo.experiment import write_json
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
from fgds_engine.solvers import resolve_scheduler
from fgds_engine.train import TrainConfig, predict


def cached_models(cache_dir: Path, cfg: DemoConfig):
    """The grid's cached generator (and its DDIM scheduler) and oracle for one seed; refuses to train."""
    def missing(_):
        raise SystemExit(f"no cached model under {cache_dir}: run experiments/schedulers.py first")

    cache = Cache(cache_dir, lambda *a: None)
    torch.manual_seed(cfg.seed)
    split(*load_digits16(), cfg)  # the data split draws from the global generator, as the demo does
    data_key = {"seed": cfg.seed, "head": cfg.head, "imbalance": cfg.imbalance, "test": cfg.test_per_class}
    unet, sched = make_generator(cfg)
    gen_key = data_key | {k: getattr(cfg, k) for k in ("gen_channels", "gen_steps", "gen_batch", "gen_lr",
                                                         "label_dropout")}
    unet = cache.model("generator", gen_key, lambda: unet, missing)
    clf_cfg = replace(TrainConfig(epochs=cfg.clf_epochs, seed=cfg.seed), epochs=cfg.oracle_epochs)
    oracle = cache.model("oracle", data_key | {"epochs": clf_cfg.epochs}, SmallCNN, missing)
    return unet, sched, oracle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out/schedulers", help="the grid's --out [demo_out/schedulers]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    ap.add_argument("--n", type=int, default=300, help="unguided samples per seed and row [300]")
    ap.add_argument("--json", default="benchmarks/results/bench_demo_clipping-cpu.json",
                    help="[benchmarks/results/bench_demo_clipping-cpu.json]")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    fidelity: dict[str, list[float]] = {}
    for seed in args.seeds:
        cfg = DemoConfig(seed=seed)
        unet, sched, oracle = cached_models(Path(args.out) / "long-tail" / f"seed{seed}" / "cache", cfg)
        dpm = resolve_scheduler(sched, "dpmpp-2m")
        rows = {"ddim 25, clip_sample on (the demo's config)": (sched, 25),
                "ddim 25, clip_sample off": (type(sched).from_config(sched.config, clip_sample=False), 25),
                "dpmpp-2m 10": (dpm, 10),
                "dpmpp-2m 10, dynamic thresholding": (type(dpm).from_config(dpm.config, thresholding=True,
                                                                            sample_max_value=1.0), 10),
                "euler 20": (resolve_scheduler(sched, "euler"), 20)}
        labels = torch.arange(args.n) % NUM_CLASSES
        cond = Conditioning(class_labels=labels, negative_class_labels=torch.full_like(labels, NUM_CLASSES))
        for name, (s, steps) in rows.items():
            sc = SamplerConfig(num_inference_steps=steps, guidance_scale=cfg.guidance_scale,
                               feedback_scale=0.0, embedding_dropout=0.0, classifier_mean=(0.5,),
                               classifier_std=(0.5,))
            out = FeedbackGuidedSampler(unet, None, SmallCNN(), s, sc).sample(
                cond, labels, list(range(10_000, 10_000 + args.n)))
            images = (out.images.float() * 255).round() / 127.5 - 1  # as the PNG round trip gives them
            hits = (predict(oracle, images) == labels).float().mean()
            fidelity.setdefault(name, []).append(100 * float(hits))
            print(f"seed {seed}  {name:45} fidelity {fidelity[name][-1]:5.1f}%", flush=True)
    summary = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
               for k, v in fidelity.items()}
    print(f"\noracle fidelity %, unguided, {args.n} samples per seed, seeds {args.seeds}")
    for k, r in summary.items():
        print(f"  {k:45} {r['mean']:5.1f} +- {r['std']:.1f}")
    write_json(args.json, {"seeds": args.seeds, "n": args.n, "setting": "long-tail", "guidance_scale": 1.5,
                      "note": "diagnostic after the fixed grid, not part of it", "fidelity": summary})


if __name__ == "__main__":
    main()
