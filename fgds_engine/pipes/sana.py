"""Sana (``SanaPipeline``): a linear-attention DiT over a DC-AE's 32-channel latents (32x compression), the
Gemma encoder's states with their attention mask, the prompt prefixed with the pipeline's default
instruction (``complex_human_instruction``; the negative prompt without it, as the pipeline encodes it),
batched [uncond; cond] CFG, DPM-Solver with flow prediction (``solvers.FlowSolver``). Encoded as PixArt-Sigma
is (the same ``encode_prompt`` signature), plus the instruction.
"""

from __future__ import annotations

from .pixart import PixArtSigma


class Sana(PixArtSigma):
    family = "Sana"
    pipelines = ("SanaPipeline",)
    transformer = "SanaTransformer2DModel"
    float32_latents = True  # the pipeline draws and integrates in float32, the model in its dtype

    bins = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
            16: "ASPECT_RATIO_512_BIN"}

    def size_multiple(self):
        return 32

    def encode_extras(self) -> dict:
        return {"complex_human_instruction": self.call_default("complex_human_instruction")}
