"""What feedback costs in memory, per pipeline family: the peak bytes of a CFG step, a feedback step (full
gradient path and x0 path) and the final decode + score, as lines ``fixed + per_sample * batch``.

    python benchmarks/bench_feedback_memory.py [--models tiny-sd tiny-sdxl sd15-256 sdxl-256] [--json PATH]

Each line comes from probes at batches 1 and 2 (``memory.measure_lines``, what ``--batch-size auto`` plans
from): on a GPU the CUDA allocator's peaks, on the CPU the peak live tensor bytes (``memory.LiveBytes``),
which counts the same tensors without the allocator's rounding. Model sets: the tiny random SD and SDXL
pipelines (fp32, 16 px; seconds), and SD 1.5 / SDXL's published UNet and VAE configs with random weights at
256 px (fp32 on the CPU: minutes, and about 12 GB of memory for SDXL's weights), the classifier (ResNeXt-50)
at 224 px. The feedback line is the one that sets the batch: the per-sample ratio feedback / CFG says what a
guided batch costs against an unguided one, and SDXL's against SD's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fgds_engine.bench import commit, cond_for, device_name, versions
from fgds_engine.memory import measure_lines
from fgds_engine.models import tiny_classifier, tiny_pipeline
from fgds_engine.models.published import sd15_models, sdxl_models
from fgds_engine.models.tiny import Models
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig


def _tiny(kind: str) -> tuple[Models, dict]:
    pipe = tiny_pipeline(kind)
    m = Models(pipe.unet, pipe.vae, tiny_classifier(10), pipe.scheduler,
               text_dim=pipe.unet.config.cross_attention_dim, upcast_vae=kind == "sdxl")
    return m, dict(classifier_size=None, text_len=77)


MODELS = {
    "tiny-sd": lambda: _tiny("sd"),
    "tiny-sdxl": lambda: _tiny("sdxl"),
    "sd15-256": lambda: (sd15_models(256, num_classes=10), dict(classifier_size=224, text_len=77)),
    "sdxl-256": lambda: (sdxl_models(256, num_classes=10), dict(classifier_size=224, text_len=77)),
}


def params_gib(*mods) -> float:
    return sum(p.numel() * p.element_size() for m in mods if m is not None for p in m.parameters()) / 2**30


def measure(name: str, device: torch.device) -> dict:
    t0 = time.monotonic()
    m, spec = MODELS[name]()
    for mod in (m.unet, m.vae, m.classifier):
        mod.to(device)
    out = {"models": name, "unet_params_M": round(sum(p.numel() for p in m.unet.parameters()) / 1e6, 1),
           "weights_gib": round(params_gib(m.unet, m.vae, m.classifier), 3)}
    for path in ("full", "x0"):
        cfg = SamplerConfig(num_inference_steps=10, feedback_every=1, feedback_scale=0.03, grad_path=path,
                            classifier_size=spec["classifier_size"], guidance_scale=3.0)
        sampler = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg,
                                        upcast_vae=m.upcast_vae)
        lines = measure_lines(sampler, lambda b: cond_for(m, b, spec["text_len"], device))
        gib = {k: line.gib() for k, line in zip(("cfg", "feedback", "final"), lines)}
        if path == "full":
            out.update(cfg_gib=gib["cfg"], feedback_full_gib=gib["feedback"], final_gib=gib["final"])
        else:
            out["feedback_x0_gib"] = gib["feedback"]
    out["feedback_full_per_sample_vs_cfg"] = round(out["feedback_full_gib"][1] / out["cfg_gib"][1], 2)
    out["feedback_x0_per_sample_vs_cfg"] = round(out["feedback_x0_gib"][1] / out["cfg_gib"][1], 2)
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help=f"[{' '.join(MODELS)}]")
    ap.add_argument("--device", default="cpu", help="[cpu]")
    ap.add_argument("--json", help="[benchmarks/results/bench_feedback_memory-<device>.json]")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = [measure(name, device) for name in args.models]
    result = {"device": device_name(device), "commit": commit(), **versions(),
              "measured": ("the CUDA allocator's peaks" if device.type == "cuda"
                           else "peak live tensor bytes (memory.LiveBytes)"),
              "lines": "[fixed GiB, GiB per sample] from probes at batches 1 and 2", "rows": rows}
    path = Path(args.json or f"benchmarks/results/bench_feedback_memory-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
