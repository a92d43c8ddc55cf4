"""FLOPs of one denoiser pass of the transformer families' published configs, counted on the meta device.

    python benchmarks/flops_transformers.py [--sizes 512 1024] [--json PATH]

No weights and no memory: the models are built on the meta device and one conditional forward pass (batch 1,
the pipelines' text lengths) runs under torch's FLOP counter, which counts shapes. Per model and image size:
parameters, TFLOP per forward pass, and what one step costs per sample in the engine's terms: a CFG step is
two passes (SD3, PixArt; FLUX.1-dev: one, its guidance is an input), a feedback step adds the backward
through the conditional pass (about 2x its forward) before the decoder and classifier. The memory lines
need a GPU: the harvest's bench-flux-512 step records them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fgds_engine.bench import count_flops
from fgds_engine.conditioning import random_conditioning
from fgds_engine.models import denoiser_output, latent_channels

MODELS = {  # name -> (config builder of image size, class, text length, CFG passes per step)
    "sd3-medium": ("sd3_medium_transformer_config", "SD3Transformer2DModel", 333, 2),
    "flux-dev": ("flux_dev_transformer_config", "FluxTransformer2DModel", 512, 1),
    "pixart-sigma": ("pixart_sigma_transformer_config", "PixArtTransformer2DModel", 300, 2),
}


def measure(name: str, size: int) -> dict:
    import diffusers

    from fgds_engine.models import published

    builder, cls, text_len, passes = MODELS[name]
    make = getattr(published, builder)
    config = make() if name == "flux-dev" else make(size // 8)
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
        cond = random_conditioning(model.config, 1, text_len)
        x = torch.empty(1, latent_channels(model), size // 8, size // 8)
        t = torch.tensor(500.0)
    forward = count_flops(lambda: denoiser_output(model, x, t, cond))
    return {"params": sum(p.numel() for p in model.parameters()), "image_size": size, "text_len": text_len,
            "forward_tflop": forward / 1e12, "cfg_step_tflop": passes * forward / 1e12,
            "cfg_passes": passes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="[512 1024]")
    ap.add_argument("--json", default="benchmarks/results/flops_transformers-meta.json")
    args = ap.parse_args(argv)
    rows = {f"{n} {s}": measure(n, s) for n in MODELS for s in args.sizes}
    for k, r in rows.items():
        print(f"{k:20} {r['params'] / 1e9:6.2f} B  forward {r['forward_tflop']:7.2f} TFLOP  "
              f"CFG step {r['cfg_step_tflop']:7.2f} TFLOP")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"counted": "torch.utils.flop_counter on the meta device, batch 1",
                                           "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
