"""Per-sample time of the demo-loop reference against the batched engine, measured in the same process.

    python benchmarks/bench_sampler.py [--sizes tiny small] [--steps 30] [--json PATH]

Prints a table (per-sample seconds, ratio to the reference) and where one engine run spends its time, and
writes JSON with the device, versions and commit. On CPU only ratios mean something across machines.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from common import commit, device_name, fastest, versions

from fgds_engine.conditioning import Conditioning
from fgds_engine.models import decode, small_models, tiny_models, unet_eps
from fgds_engine.reference import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig

BUILDERS = {"tiny": tiny_models, "small": small_models}


def _timed(fn, device, repeats=1):
    """Fastest of ``repeats`` timed calls of fn(), after one untimed warm-up (robust on a shared machine)."""
    return fastest(fn, device, repeats=repeats)


def _cond(m, batch, device):
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(batch, 8, m.text_dim, generator=g)
    return Conditioning(pe, torch.zeros_like(pe)).to(device)


def breakdown(m, sampler, batch, device):
    """Seconds of each component of one engine run at this batch size, and their shares."""
    cfg, dev = sampler.config, device
    x = torch.randn(batch, *sampler.latent_shape, device=dev)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cond = _cond(m, batch, dev)
    t = int(sampler.schedule.timesteps[0])
    a_t = sampler.schedule.alphas(0)[0]
    labels = torch.arange(batch, device=dev) % sampler.classifier.num_classes
    n_fb = sum(cfg.is_feedback_step(i) for i in range(cfg.num_inference_steps))
    n_plain = cfg.num_inference_steps - n_fb
    with torch.no_grad():
        t_cfg = _timed(lambda: sampler._cfg_pass(x, t, cond, cond.unconditional()), dev)
        t_half = _timed(lambda: unet_eps(m.unet, x, t, cond.prompt_embeds), dev)
        s = x.clone()
        t_dec = _timed(lambda: decode(m.vae, s), dev)
        img = decode(m.vae, s).float() / 2 + 0.5
        t_clf = _timed(lambda: sampler._classify(img, labels), dev)
    t_fb = _timed(lambda: sampler._feedback_pass(x, t, a_t, cond, cond.unconditional(), labels), dev)
    t_bwd = max(t_fb - 2 * t_half - t_dec - t_clf, 0.0)
    parts = {
        "unet_forward": n_plain * t_cfg + n_fb * 2 * t_half,
        "decoder_forward": n_fb * t_dec + t_dec,  # + the final decode
        "classifier_forward": n_fb * t_clf + t_clf,
        "backward": n_fb * t_bwd,
    }
    total = sum(parts.values())
    return {k: {"seconds": v, "share": v / total} for k, v in parts.items()}


def run_size(size, steps, batches, repeats, device):
    m = BUILDERS[size](num_classes=10)
    for mod in (m.unet, m.vae, m.classifier):
        if mod is not None:
            mod.to(device)
    cfg = SamplerConfig.faithful(num_inference_steps=steps, criterion="entropy", feedback_scale=0.03)
    sampler = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg)
    params = sum(p.numel() for p in m.unet.parameters())
    rows = []
    cond1 = _cond(m, 1, device)
    ref = _timed(lambda: sample_one(m.unet, m.vae, m.classifier, m.scheduler, cfg, cond1, 3, 3), device,
                 repeats)
    rows.append({"impl": "reference (demo loop)", "batch": 1, "per_sample_s": ref, "ratio": 1.0})
    for b in batches:
        cond = _cond(m, b, device)
        labels, seeds = [k % 10 for k in range(b)], list(range(b))
        sec = _timed(lambda c=cond, y=labels, s=seeds: sampler.sample(c, y, s), device, repeats) / b
        rows.append({"impl": "engine", "batch": b, "per_sample_s": sec, "ratio": ref / sec})
    # channels-last last: it converts the models in place (the reference above ran on the default format)
    fast = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, replace(cfg, channels_last=True))
    b = max(batches)
    cond = _cond(m, b, device)
    sec = _timed(lambda: fast.sample(cond, [k % 10 for k in range(b)], list(range(b))), device, repeats) / b
    rows.append({"impl": "engine channels_last", "batch": b, "per_sample_s": sec, "ratio": ref / sec})
    parts = breakdown(m, fast, b, device)
    return {"size": size, "unet_params_M": params / 1e6, "latent_shape": list(sampler.latent_shape),
            "image_size": sampler.image_size, "steps": steps,
            "feedback_steps": [i for i in range(steps) if cfg.is_feedback_step(i)],
            "rows": rows, "breakdown_batch": max(batches), "breakdown": parts}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(BUILDERS))
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (feedback every 5th) [30]")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="engine batch sizes [1 8]")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row, fastest kept [3]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None,
                    help="output file [benchmarks/results/bench_sampler-<device>.json]")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = device_name(device)
    results = [run_size(s, args.steps, args.batches, args.repeats, device) for s in args.sizes]
    print(f"\ndevice: {name}   torch {torch.__version__}")
    print(f"{'size':6} {'impl':24} {'batch':>5} {'s/sample':>10} {'vs reference':>13}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['size']:6} {row['impl']:24} {row['batch']:5d} {row['per_sample_s']:10.4f} "
                  f"{row['ratio']:12.2f}x")
        shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in r["breakdown"].items())
        print(f"{'':6} engine time at batch {r['breakdown_batch']}: {shares}")
    out = Path(args.json or f"benchmarks/results/bench_sampler-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, **versions(), "commit": commit(),
                               "timing": f"fastest of {args.repeats} after a warm-up",
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
