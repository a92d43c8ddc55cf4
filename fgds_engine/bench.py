"""`fgds bench`: per-sample time of the demo-loop reference against the batched engine, in the same process.

Presets (random weights: timing needs no checkpoint):
    tiny      the test models (16x16 images); small: a 12.8 M UNet, 64x64 images, ResNet-18 (CPU sizes)
    sd15-256  Stable Diffusion 1.5's UNet and VAE configs (written here) at 256 px, ResNeXt-50 at 224
    sd15-512  the same at 512 px
Reported per row: samples/s, seconds per sample, the ratio to the reference measured in the same run; per
preset: a component breakdown, FLOPs per sample (torch.utils.flop_counter) and the achieved TFLOP/s as a
fraction of the dense-matmul peak measured in the same run. The paper's own per-sample V100 timings (its
Table 5) could not be retrieved: they appear as a documented unknown, never as a number.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from dataclasses import replace

import torch

from .conditioning import Conditioning
from .models import Models, decode, small_models, tiny_models, unet_eps
from .sampler import FeedbackGuidedSampler, SamplerConfig

PAPER_V100 = {"impl": "paper Table 5 (V100, per sample, no batching)", "per_sample_s": None,
              "note": "not retrievable here; a documented unknown, not a measurement"}


def sd15_unet_config(sample_size: int) -> dict:
    """Stable Diffusion 1.5's UNet (859.5 M parameters); sample_size = image size / 8."""
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def sd15_vae_config(image_size: int) -> dict:
    """Stable Diffusion 1.5's AutoencoderKL (83.7 M parameters)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=image_size,
                scaling_factor=0.18215)


def sd15_models(image_size: int, *, num_classes: int = 1000, seed: int = 0, device="cpu") -> Models:
    """SD 1.5 UNet + VAE and a timm ResNeXt-50 (32x4d), random weights, built on ``device``."""
    import timm
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config(image_size // 8))
        vae = AutoencoderKL(**sd15_vae_config(image_size))
        clf = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=num_classes)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return Models(unet, vae, clf, sched, text_dim=768)


PRESETS = {
    "tiny": dict(build=lambda dev: tiny_models(num_classes=10), classifier_size=None, text_len=8),
    "small": dict(build=lambda dev: small_models(num_classes=10), classifier_size=None, text_len=8),
    "sd15-256": dict(build=lambda dev: sd15_models(256, device=dev), classifier_size=224, text_len=77),
    "sd15-512": dict(build=lambda dev: sd15_models(512, device=dev), classifier_size=224, text_len=77),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(fn, device: torch.device, repeats: int = 1, inner: int = 1) -> float:
    """Seconds per call of fn(): the fastest of ``repeats`` timings of ``inner`` back-to-back calls, after
    one untimed warm-up; the device is synchronised before and after every timing."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense-matmul FLOP/s in ``dtype`` (n = 8192 on a GPU, 1024 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    sec = fastest(lambda: [a @ b for _ in range(reps)], device, repeats=3) / reps
    return 2 * n**3 / sec


def cond_for(m: Models, batch: int, text_len: int, device) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(batch, text_len, m.text_dim, generator=g)
    return Conditioning(pe, torch.zeros_like(pe)).to(device, next(m.unet.parameters()).dtype)


def count_flops(fn) -> int | None:
    """FLOPs of ``fn()`` (matmuls, convolutions, attention; forward and backward) by torch's flop formulas.

    A dispatch mode rather than FlopCounterMode: the latter's module hooks reject ``autograd.grad`` on a
    leaf, which the feedback step uses. None where this torch lacks the formulas.
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
    except ImportError:
        return None

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                _Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with _Count():
        fn()
    return _Count.total


def step_costs(sampler: FeedbackGuidedSampler, m: Models, batch: int, text_len: int, device, *,
               flops: bool) -> dict:
    """Seconds (and FLOPs) of one CFG step, one feedback step, one final decode + classification."""
    x = torch.randn(batch, *sampler.latent_shape, device=device, dtype=sampler.dtype)
    cond = cond_for(m, batch, text_len, device)
    t = int(sampler.schedule.timesteps[0])
    a_t = sampler.schedule.alphas(0)[0]
    labels = torch.arange(batch, device=device) % sampler.classifier.num_classes
    nan = torch.zeros(batch, dtype=torch.bool, device=device)
    parts = {
        "cfg_step": lambda: sampler._cfg_pass(x, t, cond, cond.unconditional()),
        "feedback_step": lambda: sampler._feedback_pass(x, t, a_t, cond, cond.unconditional(), labels),
        "final": lambda: sampler._finish(x, labels, nan),
    }
    out = {}
    for name, fn in parts.items():
        out[name] = {"seconds": fastest(fn, device)}
        if flops:
            out[name]["flops"] = count_flops(fn)
    with torch.no_grad():
        out["decoder"] = {"seconds": fastest(lambda: decode(sampler.vae, x), device)}
        out["unet_half"] = {"seconds": fastest(lambda: unet_eps(m.unet, x, t, cond.prompt_embeds), device)}
    return out


def run_preset(preset: str, *, batches=(1, 8, 32), steps: int = 30, feedback_every=(5, 1), repeats: int = 1,
               device: torch.device | str = "cpu", dtype: str | None = None, attention: str | None = None,
               channels_last: bool = False, log=print) -> dict:
    """All rows of one preset: the reference at batch 1, the engine at each batch, per feedback frequency."""
    from .reference import sample_one

    device = torch.device(device)
    spec = PRESETS[preset]
    m = spec["build"](device)
    for mod in (m.unet, m.vae, m.classifier):
        if mod is not None:
            mod.to(device)
    extra = {} if attention is None else {"attention": attention}
    run_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    peak = matmul_peak(device, run_dtype)
    result = {"preset": preset, "steps": steps, "dtype": dtype or "float32", "unet_params_M":
              sum(p.numel() for p in m.unet.parameters()) / 1e6, "matmul_peak_tflops": peak / 1e12,
              "runs": []}
    for every in feedback_every:
        cfg = SamplerConfig.faithful(num_inference_steps=steps, criterion="entropy", feedback_scale=0.03,
                                     feedback_every=every, dtype=dtype, channels_last=channels_last,
                                     classifier_size=spec["classifier_size"], **extra)
        sampler = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg)
        n_fb = sum(cfg.is_feedback_step(i) for i in range(steps))
        log(f"[{preset}] feedback every {every} step(s): reference at batch 1 ...")
        cond1 = cond_for(m, 1, spec["text_len"], device)
        one = lambda cfg=cfg, c1=cond1: sample_one(m.unet, m.vae, m.classifier, m.scheduler, cfg, c1, 3, 3)  # noqa
        ref = fastest(one, device, repeats)
        rows = [{"impl": "reference (demo loop)", "batch": 1, "per_sample_s": ref, "samples_per_s": 1 / ref,
                 "ratio": 1.0}, dict(PAPER_V100)]
        best = None  # (row, batch) of the largest batch that fitted
        for b in batches:
            log(f"[{preset}] feedback every {every}: engine at batch {b} ...")
            cond = cond_for(m, b, spec["text_len"], device)
            labels, seeds = [k % sampler.classifier.num_classes for k in range(b)], list(range(b))
            run = lambda c=cond, y=labels, s=seeds, smp=sampler: smp.sample(c, y, s)  # noqa: E731
            try:
                sec = fastest(run, device, repeats) / b
            except torch.cuda.OutOfMemoryError:
                log(f"[{preset}] batch {b}: out of memory")
                rows.append({"impl": "engine", "batch": b, "per_sample_s": None, "note": "out of memory"})
                torch.cuda.empty_cache()
                continue
            row = {"impl": "engine", "batch": b, "per_sample_s": sec, "samples_per_s": 1 / sec,
                   "ratio": ref / sec}
            rows.append(row)
            best = (row, b)
        if best is None:
            raise RuntimeError(f"{preset}: no batch size fitted in memory")
        row, b = best
        if sampler.graphs is not None:  # the same batch without CUDA graphs: what capture buys, measured
            eager = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler,
                                          replace(cfg, cuda_graphs=False))
            cond = cond_for(m, b, spec["text_len"], device)
            labels, seeds = [k % sampler.classifier.num_classes for k in range(b)], list(range(b))
            run = lambda e=eager, c=cond, y=labels, s=seeds: e.sample(c, y, s)  # noqa: E731
            sec = fastest(run, device, repeats) / b
            rows.append({"impl": "engine (eager, no CUDA graphs)", "batch": b, "per_sample_s": sec,
                         "samples_per_s": 1 / sec, "ratio": ref / sec})
        costs = step_costs(sampler, m, b, spec["text_len"], device, flops=True)
        if costs["cfg_step"]["flops"] is not None:
            flops = ((steps - n_fb) * costs["cfg_step"]["flops"]
                     + n_fb * costs["feedback_step"]["flops"] + costs["final"]["flops"]) / b
            sec = row["per_sample_s"]
            row.update(flops_per_sample=flops, tflops=flops / sec / 1e12, fraction_of_peak=flops / sec / peak)
        total = (steps - n_fb) * costs["cfg_step"]["seconds"] + n_fb * costs["feedback_step"]["seconds"] \
            + costs["final"]["seconds"]
        breakdown = {"cfg_steps": (steps - n_fb) * costs["cfg_step"]["seconds"] / total,
                     "feedback_steps": n_fb * costs["feedback_step"]["seconds"] / total,
                     "final_decode_and_score": costs["final"]["seconds"] / total,
                     "decoder_forward_per_call_s": costs["decoder"]["seconds"],
                     "unet_half_forward_per_call_s": costs["unet_half"]["seconds"]}
        result["runs"].append({"feedback_every": every, "feedback_steps": n_fb, "rows": rows,
                               "breakdown_batch": b, "breakdown": breakdown,
                               "attention": sampler.attention, "graphs": sampler.graphs_status,
                               "backend": sampler.backend, "channels_last": cfg.channels_last})
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def commit() -> str | None:
    """The checkout's short commit hash (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    """torch, triton (None if absent) and Python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}


def environment(device: torch.device) -> dict:
    return {"device": device_name(device), **versions(), "commit": commit()}


def format_result(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        lines.append(f"{result['preset']}: {result['steps']} steps, feedback every {run['feedback_every']} "
                     f"({run['feedback_steps']} feedback steps), {result['dtype']}, matmul peak "
                     f"{result['matmul_peak_tflops']:.2f} TFLOP/s; attention {run['attention']}, step "
                     f"backend {run['backend']}, {run['graphs']}, channels-last {run['channels_last']}")
        lines.append(f"  {'impl':46} {'batch':>5} {'s/sample':>9} {'samples/s':>10} {'vs ref':>7} "
                     f"{'TFLOP/s':>8} {'of peak':>8}")
        for r in run["rows"]:
            if r.get("per_sample_s") is None:
                lines.append(f"  {r['impl']:46} {r.get('batch', '-'):>5} {'unknown':>9}   ({r['note']})")
                continue
            extra = f"{r['tflops']:8.2f} {r['fraction_of_peak']:8.1%}" if "tflops" in r else ""
            lines.append(f"  {r['impl']:46} {r['batch']:5d} {r['per_sample_s']:9.4f} "
                         f"{r['samples_per_s']:10.2f} {r['ratio']:6.2f}x {extra}")
        b = run["breakdown"]
        lines.append(f"  engine time at batch {run['breakdown_batch']}: CFG steps {b['cfg_steps']:.0%}, "
                     f"feedback steps {b['feedback_steps']:.0%}, final decode + score "
                     f"{b['final_decode_and_score']:.0%}")
    return "\n".join(lines)


def main_bench(preset: str, *, batches, steps, feedback_every, repeats, device, dtype, attention,
               channels_last, json_path) -> dict:
    import json
    from pathlib import Path

    device = torch.device(device)
    result = run_preset(preset, batches=batches, steps=steps, feedback_every=feedback_every, repeats=repeats,
                        device=device, dtype=dtype, attention=attention, channels_last=channels_last)
    env = environment(device)
    print(f"\ndevice: {env['device']}   torch {env['torch']}   triton {env['triton']}   "
          f"commit {env['commit']}")
    print(format_result(result))
    path = Path(json_path or f"benchmarks/results/bench-{preset}-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    timing = f"fastest of {repeats} after a warm-up"
    path.write_text(json.dumps({**env, "timing": timing, **result}, indent=2))
    print(f"wrote {path}")
    return result

