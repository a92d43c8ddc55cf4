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

    def encode_extras(self) -> dict:
        return {"complex_human_instruction": self.call_default("complex_human_instruction")}
