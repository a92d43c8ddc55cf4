"""The fused guided DDIM step against the eager torch sequence it replaces, in the same process.

    python benchmarks/bench_step.py [--batch 32] [--shape 4 64 64] [--dtype float16] [--json PATH]

The competitor ("eager") is what a diffusers loop runs per step: the CFG combine, the per-sample feedback
normalisation and shift in the latents' dtype (fp32 norms), then ``DDIMScheduler.step``. Rows: eager, then
each fused backend this device runs (torch on the CPU; torch, triton and cuda on a GPU). Each row is checked
against the reference before it is timed. Efficiency: the op's unavoidable traffic (every input read once,
both outputs written once) over its time, as a fraction of this device's measured copy bandwidth: of a large
copy (256 MB on a GPU, the device's peak) and of a copy moving the op's own byte count (what a single
memory-bound launch of this size can reach, launch latency included).

On the CPU, glibc returns each freed multi-MB temporary to the OS, and the page faults of the next allocation
then dominate a memory-bound op (seen: the same row at 0.6 and 3 ms); ``make bench`` sets
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ so that freed memory is reused, as torch's CUDA allocator
does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from fgds_engine.bench import commit, device_name, eager_step, fastest, fastest_interleaved, versions
from fgds_engine.config import DTYPES
from fgds_engine.ops import cuda_lib, fused_guided_ddim_step, guided_ddim_step


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured bytes/s of dst.copy_(src) (read + write) for a buffer of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    inner = 50 if device.type == "cuda" else 3
    return 2 * src.numel() * 4 / fastest(lambda: dst.copy_(src), device, repeats=5, inner=inner)


def run(batch, shape, dtype, device, repeats):
    g = torch.Generator().manual_seed(0)
    mk = lambda: torch.randn(batch, *shape, generator=g).to(device, dtype)  # noqa: E731
    eps_u, eps_c, x, grad = mk(), mk(), mk(), mk()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(30)
    t = int(sched.timesteps[10])
    a_t, a_prev = sched.alphas_cumprod[t].to(device), sched.alphas_cumprod[t - 1000 // 30].to(device)
    fused = ["torch"]
    if device.type == "cuda":
        fused += ["triton"] + (["cuda"] if cuda_lib.available() else [])
    inner = 100 if device.type == "cuda" else 5
    elem = x.numel() * x.element_size()
    results = []
    for feedback in (False, True):
        gr = grad if feedback else None
        kw = dict(guidance_scale=5.0, grad=gr, feedback_scale=0.03, feedback_mode="shift")
        want = guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, **kw)
        ideal = elem * ((4 if feedback else 3) + 2)  # reads eps_u, eps_c, x (+ grad); writes x_prev, x0
        calls = {"eager": lambda gr=gr: eager_step(sched, t, eps_u, eps_c, x, gr, w=5.0, scale=0.03)}
        for b in fused:
            calls[b] = lambda b=b, kw=kw: fused_guided_ddim_step(eps_u, eps_c, x, a_t, a_prev, backend=b,
                                                                 **kw)
        errs = {name: max((u.float() - v.float()).abs().max().item() for u, v in zip(fn(), want))
                for name, fn in calls.items()}
        secs = fastest_interleaved(calls, device, repeats=repeats, inner=inner)
        for name, sec in secs.items():
            results.append({"impl": name, "feedback": feedback, "us_per_call": sec * 1e6,
                            "speedup": secs["eager"] / sec, "ideal_bytes": ideal,
                            "gbytes_per_s": ideal / sec / 1e9, "max_abs_err": errs[name]})
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="latents per call [32]")
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64], help="latent shape C H W [4 64 64]")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="latent dtype [float16 on a GPU, float32 on the CPU]")
    ap.add_argument("--repeats", type=int, default=10, help="timing rounds, fastest kept per row [10]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="output file [benchmarks/results/bench_step-<device>.json]")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    run(args.batch, tuple(args.shape), dtype, device, 2)  # discarded: the allocator's state settles first
    rows = run(args.batch, tuple(args.shape), dtype, device, args.repeats)
    bw = copy_bandwidth(device, 256 << 20 if device.type == "cuda" else 64 << 20)
    same = {r["feedback"]: copy_bandwidth(device, r["ideal_bytes"] // 2) for r in rows}
    for r in rows:
        r["fraction_of_copy_bw"] = r["gbytes_per_s"] * 1e9 / bw
        r["copy_same_bytes_gbytes_per_s"] = same[r["feedback"]] / 1e9
        r["fraction_of_same_size_copy"] = r["gbytes_per_s"] * 1e9 / same[r["feedback"]]
    name = device_name(device)
    print(f"device: {name}   latents {args.batch}x{'x'.join(map(str, args.shape))} {dtype}   "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'impl':8} {'feedback':>8} {'us/call':>10} {'vs eager':>9} {'GB/s':>8} {'of copy':>8} "
          f"{'of same-size copy':>18} {'max err':>9}")
    for r in rows:
        print(f"{r['impl']:8} {str(r['feedback']):>8} {r['us_per_call']:10.1f} {r['speedup']:8.2f}x "
              f"{r['gbytes_per_s']:8.1f} {r['fraction_of_copy_bw']:8.1%} "
              f"{r['fraction_of_same_size_copy']:18.1%} {r['max_abs_err']:9.2e}")
    out = Path(args.json or f"benchmarks/results/bench_step-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, **versions(), "commit": commit(), "batch": args.batch,
                               "shape": args.shape, "dtype": str(dtype), "copy_gbytes_per_s": bw / 1e9,
                               "timing": f"fastest of {args.repeats} interleaved rounds after a warm-up",
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
