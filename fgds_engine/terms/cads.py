"""Condition-annealed sampling (CADS; Sadat et al., ICLR 2024) on a batch's conditioning.

At diffusion time t (1 = noise) with g = ``CADS.gamma(t)``, each conditional embedding y of a
sample becomes

    y' = sqrt(g) y + s sqrt(1 - g) n,   n ~ N(0, I) from the sample's own generator,
    y' <- psi * (y' - mean(y')) / std(y') * std(y) + mean(y) + (1 - psi) * y'     (per sample, all dims)

for the text embeddings (``prompt_embeds``), the image embeddings (float ``class_labels``) and, for a
class-conditional UNet, the UNet's own class embedding of the integer labels (``embed_class_labels`` turns
the labels into those embeddings once per run, and ``PassThroughClassEmbedding`` lets the UNet take them: the
same values the UNet would look up, so g = 1 changes nothing). The unconditional half is never annealed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..conditioning import Conditioning
from .base import Batch, GuidanceTerm

FIELDS = ("prompt_embeds", "class_labels")  # the conditional fields CADS anneals (float tensors)


def anneal(y: torch.Tensor, gamma: float, noise: torch.Tensor, s: float, psi: float) -> torch.Tensor:
    """CADS's annealed embedding of y (rows = samples), in y's dtype; fp32 arithmetic."""
    yf = y.float()
    out = gamma ** 0.5 * yf + s * (1 - gamma) ** 0.5 * noise.to(yf.device, torch.float32)
    if psi > 0:
        dims = tuple(range(1, y.dim()))
        mean_in, std_in = yf.mean(dims, keepdim=True), yf.std(dims, keepdim=True)
        mean_out, std_out = out.mean(dims, keepdim=True), out.std(dims, keepdim=True)
        rescaled = (out - mean_out) / std_out.clamp_min(1e-12) * std_in + mean_in
        out = psi * rescaled + (1 - psi) * out
    return out.to(y.dtype)


def draw(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One N(0, I) row per sample shaped like a row of ``like``, from each sample's generator (CPU, fp32)."""
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators])


def annealed(cond: Conditioning, gamma: float, generators: list[torch.Generator], s: float,
             psi: float) -> Conditioning:
    """The conditioning with its float conditional fields annealed at ``gamma`` (itself when gamma == 1)."""
    if gamma >= 1.0:
        return cond
    changes = {}
    for name in FIELDS:
        y = getattr(cond, name)
        if y is not None and y.is_floating_point():
            changes[name] = anneal(y, gamma, draw(generators, y), s, psi)
    if not changes:
        raise ValueError("CADS needs float conditioning (text or image embeddings, or class embeddings via "
                         "embed_class_labels)")
    flat = cond.flat()
    flat.update(changes)
    return Conditioning.from_flat(flat)


class PassThroughClassEmbedding(nn.Module):
    """The UNet's class embedding, taking float embeddings as they are and integer labels as before."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if labels.is_floating_point() else self.embedding(labels)


def class_embedding_of(unet) -> nn.Module | None:
    emb = getattr(unet, "class_embedding", None)
    return emb.embedding if isinstance(emb, PassThroughClassEmbedding) else emb


@contextlib.contextmanager
def embeddings_as_class_labels(unet):
    """For the duration: the UNet takes class embeddings (floats) as ``class_labels`` as well as labels."""
    emb = getattr(unet, "class_embedding", None)
    if emb is None or isinstance(emb, PassThroughClassEmbedding):
        yield
        return
    unet.class_embedding = PassThroughClassEmbedding(emb)
    try:
        yield
    finally:
        unet.class_embedding = emb


def embed_class_labels(unet, cond: Conditioning) -> Conditioning:
    """Integer class labels (both halves) replaced by the UNet's own embeddings of them (no gradient)."""
    if cond.class_labels is None or cond.class_labels.is_floating_point():
        return cond
    if getattr(unet.config, "class_embed_type", None) is not None:
        raise ValueError(f"CADS on integer class labels needs a plain class embedding table; this UNet's "
                         f"class_embed_type is {unet.config.class_embed_type!r}")
    emb = class_embedding_of(unet)
    if not isinstance(emb, nn.Embedding):
        raise ValueError("CADS on integer class labels needs the UNet's class embedding table "
                         "(num_class_embeds)")
    with torch.no_grad():
        flat = cond.flat()
        for name in ("class_labels", "negative_class_labels"):
            if flat.get(name) is not None:
                flat[name] = emb(flat[name]).float()
    return Conditioning.from_flat(flat)


class CADS(GuidanceTerm):
    """The conditioning term: the conditional half annealed at each step's diffusion time, with noise from
    each sample's generator; integer class labels as the UNet's own embeddings of them for the batch.
    ``window`` (tau1, tau2); ``noise`` s; ``rescale`` psi. Neutral: a window no step's time exceeds
    (g = 1 everywhere: the conditioning as it is)."""

    name = "cads"

    def __init__(self, window: tuple[float, float], noise: float = 0.25, rescale: float = 1.0):
        self.window, self.noise, self.rescale = window, noise, rescale

    def gamma(self, t: float) -> float:
        """g at diffusion time t in [0, 1]: 1 below tau1, 0 above tau2, linear between."""
        tau1, tau2 = self.window
        return 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)

    def prepare(self, cond: Conditioning, unet) -> Conditioning:
        return embed_class_labels(unet, cond) if _int_labels(cond) else cond

    def context(self, cond: Conditioning, unet):
        return embeddings_as_class_labels(unet) if _int_labels(cond) else contextlib.nullcontext()

    def conditioning(self, i: int, cond: Conditioning, batch: Batch) -> Conditioning:
        return annealed(cond, self.gamma(batch.run.t_host[i]), batch.generators, self.noise, self.rescale)


def _int_labels(cond: Conditioning) -> bool:
    return cond.class_labels is not None and not cond.class_labels.is_floating_point()
