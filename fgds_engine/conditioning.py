"""Conditioning of a batch: text embeddings, image embedding / class labels, their unconditional pairs.

Names follow diffusers: ``prompt_embeds`` (text encoder hidden states), ``class_labels`` (an image embedding
[B, E] for unCLIP-style UNets, or integer classes [B] for class-conditional ones).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Conditioning:
    """Per-sample conditioning and its unconditional ("negative") counterpart for classifier-free guidance.

    Args:
        prompt_embeds: [B, L, D] text hidden states, or None for UNets without cross-attention.
        negative_prompt_embeds: [B, L, D] unconditional text states (needed with CFG when prompts are used).
        class_labels: [B, E] image embedding (float) or [B] integer classes, or None.
        negative_class_labels: unconditional class_labels; defaults to zeros for image embeddings (as the
            unCLIP pipelines do); integer classes need it explicitly (the null class).
    """

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    negative_class_labels: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {name: t.shape[0] for name, t in self._fields() if t is not None}
        if not sizes:
            raise ValueError("Conditioning needs prompt_embeds or class_labels")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning tensors disagree on the batch size: {sizes}")

    def _fields(self):
        names = ("prompt_embeds", "negative_prompt_embeds", "class_labels", "negative_class_labels")
        return [(n, getattr(self, n)) for n in names]

    def __len__(self) -> int:
        return next(t.shape[0] for _, t in self._fields() if t is not None)

    @property
    def has_image_embeds(self) -> bool:
        return self.class_labels is not None and self.class_labels.is_floating_point()

    def select(self, index) -> Conditioning:
        """The conditioning of the samples at ``index`` (an int keeps a batch dimension of 1)."""
        idx = [index] if isinstance(index, int) else index
        return Conditioning(*[None if t is None else t[idx] for _, t in self._fields()])

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to a device; floating tensors are cast to ``dtype`` if given."""
        def mv(t):
            if t is None:
                return None
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return Conditioning(*[mv(t) for _, t in self._fields()])

    def unconditional(self) -> Conditioning:
        """The negative half used for the unconditional branch of CFG."""
        if self.prompt_embeds is not None and self.negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds (encode an empty prompt)")
        neg_cl = self.negative_class_labels
        if self.class_labels is not None and neg_cl is None:
            if not self.has_image_embeds:
                raise ValueError("classifier-free guidance with integer class_labels needs "
                                 "negative_class_labels (the null class)")
            neg_cl = torch.zeros_like(self.class_labels)
        return Conditioning(self.negative_prompt_embeds, None, neg_cl, None)

    def with_embedding_dropout(self, generators: list[torch.Generator], p: float) -> Conditioning:
        """Replace each sample's image embedding by its unconditional one with probability p.

        The coin of sample i is drawn from ``generators[i]`` (a sample's draw does not depend on its batch);
        nothing is drawn when p == 0 or there is no image embedding.
        """
        if p <= 0 or self.class_labels is None:
            return self
        if not self.has_image_embeds:
            raise ValueError("embedding_dropout applies to image embeddings, but class_labels holds integer "
                             "classes; set embedding_dropout=0")
        if len(generators) != len(self):
            raise ValueError(f"{len(generators)} generators for a batch of {len(self)}")
        drop = torch.tensor([bool(torch.rand((), generator=g) < p) for g in generators])
        neg = self.negative_class_labels
        neg = torch.zeros_like(self.class_labels) if neg is None else neg
        keep = ~drop.to(self.class_labels.device).reshape(-1, *([1] * (self.class_labels.dim() - 1)))
        return replace(self, class_labels=torch.where(keep, self.class_labels, neg))
