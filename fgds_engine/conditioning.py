"""Conditioning of a batch: the denoiser's keyword arguments, for the conditional and the unconditional half.

Names follow diffusers' models: ``encoder_hidden_states`` (here ``prompt_embeds``, the text encoder hidden
states), ``class_labels`` (an image embedding [B, E] for unCLIP-style UNets, or integer classes [B] for
class-conditional ones), ``added_cond_kwargs`` (SDXL: the pooled text embedding ``text_embeds`` [B, P] and the
size / crop ``time_ids`` [B, 6]), and the transformers' ``pooled_projections`` (SD3, Flux),
``encoder_attention_mask`` (here ``attention_mask``: T5's / Gemma's padding mask, PixArt, Sana) and
``guidance`` (Flux's guidance-distilled models: the CFG scale as an input). Every tensor has one row per
sample: selecting rows
(micro-batches), moving, concatenating [uncond; cond] for classifier-free guidance and the CUDA-graph static
buffers (``flat`` / ``from_flat``) all go through the same field list, so a new keyword is one field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# the model keyword each field feeds: (field, negative field, keyword); guidance has no negative: the
# unconditional half of a guidance-distilled model (true CFG) takes the same scale
_KEYWORDS = (("prompt_embeds", "negative_prompt_embeds", "encoder_hidden_states"),
             ("class_labels", "negative_class_labels", "class_labels"),
             ("added_cond_kwargs", "negative_added_cond_kwargs", "added_cond_kwargs"),
             ("pooled_projections", "negative_pooled_projections", "pooled_projections"),
             ("attention_mask", "negative_attention_mask", "encoder_attention_mask"),
             ("guidance", "guidance", "guidance"))


@dataclass(frozen=True)
class Conditioning:
    """Per-sample conditioning and its unconditional ("negative") counterpart for classifier-free guidance.

    Args:
        prompt_embeds: [B, L, D] text hidden states, or None for UNets without cross-attention.
        negative_prompt_embeds: [B, L, D] unconditional text states (needed with CFG when prompts are used).
        class_labels: [B, E] image embedding (float) or [B] integer classes, or None.
        negative_class_labels: unconditional class_labels; defaults to zeros for image embeddings (as the
            unCLIP pipelines do); integer classes need it explicitly (the null class).
        added_cond_kwargs: the UNet's ``added_cond_kwargs`` (SDXL: ``text_embeds`` [B, P], ``time_ids``
            [B, 6]), a dict of tensors with B rows each, or None.
        negative_added_cond_kwargs: their unconditional counterpart (SDXL: the negative pooled embedding,
            the same time ids); needed with CFG when ``added_cond_kwargs`` is given.
        pooled_projections, negative_pooled_projections: [B, P] pooled text embeddings (SD3, Flux).
        attention_mask, negative_attention_mask: [B, L] padding masks of the text states (PixArt, Sana).
        guidance: [B] fp32, the guidance scale a guidance-distilled model (FLUX.1-dev) takes as an input;
            both halves use it.
    """

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    negative_class_labels: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None
    pooled_projections: torch.Tensor | None = None
    negative_pooled_projections: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    negative_attention_mask: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {name: t.shape[0] for name, t in self.flat().items()}
        if self.prompt_embeds is None and self.class_labels is None:
            raise ValueError("Conditioning needs prompt_embeds or class_labels")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning tensors disagree on the batch size: {sizes}")

    # ------------------------------------------------------------------ rows and devices

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor by a flat name ("prompt_embeds", "added_cond_kwargs.time_ids", ...), None left out."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out.update({f"{f.name}.{k}": t for k, t in v.items()})
            elif v is not None:
                out[f.name] = v
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor | None]) -> Conditioning:
        """The inverse of ``flat``."""
        kw: dict = {}
        for name, t in flat.items():
            if t is None:
                continue
            if "." in name:
                field, key = name.split(".", 1)
                kw.setdefault(field, {})[key] = t
            else:
                kw[name] = t
        return cls(**kw)

    def _map(self, fn) -> Conditioning:
        return Conditioning.from_flat({n: fn(t) for n, t in self.flat().items()})

    def __len__(self) -> int:
        return next(iter(self.flat().values())).shape[0]

    @property
    def has_image_embeds(self) -> bool:
        return self.class_labels is not None and self.class_labels.is_floating_point()

    def select(self, index) -> Conditioning:
        """The conditioning of the samples at ``index`` (an int keeps a batch dimension of 1)."""
        idx = [index] if isinstance(index, int) else index
        return self._map(lambda t: t[idx])

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to a device; floating tensors are cast to ``dtype`` if given."""
        return self._map(lambda t: t.to(device, dtype) if dtype is not None and t.is_floating_point()
                         else t.to(device))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Row-wise concatenation (the same fields in every part): [uncond; cond] for one CFG call."""
        flats = [p.flat() for p in parts]
        names = set(flats[0])
        if any(set(f) != names for f in flats):
            raise ValueError(f"cannot concatenate conditionings of different fields: "
                             f"{[sorted(f) for f in flats]}")
        return Conditioning.from_flat({n: torch.cat([f[n] for f in flats]) for n in flats[0]})

    # ------------------------------------------------------------------ what the denoiser takes

    def model_kwargs(self) -> dict:
        """The conditional half as the denoiser's keyword arguments."""
        kw = {}
        for field, _, keyword in _KEYWORDS:
            v = getattr(self, field)
            if v is not None:
                kw[keyword] = dict(v) if isinstance(v, dict) else v
        return kw

    def unconditional(self) -> Conditioning:
        """The negative half used for the unconditional branch of CFG."""
        if self.prompt_embeds is not None and self.negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds (encode an empty prompt)")
        if self.added_cond_kwargs is not None and self.negative_added_cond_kwargs is None:
            raise ValueError("classifier-free guidance needs negative_added_cond_kwargs (SDXL: the negative "
                             "pooled text embedding and the time ids)")
        pairs = (("pooled_projections", "negative_pooled_projections", "pooled text embedding"),
                 ("attention_mask", "negative_attention_mask", "text attention mask"))
        for field, neg, what in pairs:
            if getattr(self, field) is not None and getattr(self, neg) is None:
                raise ValueError(f"classifier-free guidance needs {neg} (the negative prompt's {what})")
        neg_cl = self.negative_class_labels
        if self.class_labels is not None and neg_cl is None:
            if not self.has_image_embeds:
                raise ValueError("classifier-free guidance with integer class_labels needs "
                                 "negative_class_labels (the null class)")
            neg_cl = torch.zeros_like(self.class_labels)
        return Conditioning(self.negative_prompt_embeds, None, neg_cl, None, self.negative_added_cond_kwargs,
                            pooled_projections=self.negative_pooled_projections,
                            attention_mask=self.negative_attention_mask, guidance=self.guidance)

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


def cfg_kwargs(uncond: Conditioning, cond: Conditioning) -> dict:
    """The denoiser keyword arguments of one classifier-free-guidance call on [x, x]: [uncond; cond] rows."""
    u, c = uncond.model_kwargs(), cond.model_kwargs()
    if set(u) != set(c):
        raise ValueError(f"the unconditional half feeds {sorted(u)}, the conditional half {sorted(c)}")

    def cat(a, b):
        return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])
    return {k: cat(u[k], c[k]) for k in c}


def random_conditioning(unet_config, batch: int, text_len: int = 77, *, generator=None) -> Conditioning:
    """Random conditioning of the shapes a denoiser takes (a UNet's cross-attention width, a projection class
    embedding or integer classes, SDXL's text_time embedding; SD3's / Flux's joint text width and pooled
    embedding; PixArt's / Sana's caption width and mask), with zero / null unconditional halves: what a
    memory probe or a benchmark needs, whatever the pipeline's encoders are."""
    cfg = unet_config
    joint, caption = getattr(cfg, "joint_attention_dim", None), getattr(cfg, "caption_channels", None)
    if joint is not None:  # SD3, Flux: text states and a pooled embedding
        pe = torch.randn(batch, text_len, joint, generator=generator)
        pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=generator)
        # FLUX.1-dev's guidance embedding: its pipeline's default scale
        guidance = torch.full((batch,), 3.5) if getattr(cfg, "guidance_embeds", False) else None
        return Conditioning(pe, torch.zeros_like(pe), pooled_projections=pooled,
                            negative_pooled_projections=torch.zeros_like(pooled), guidance=guidance)
    if caption is not None:  # PixArt, Sana: text states with their padding mask
        pe = torch.randn(batch, text_len, caption, generator=generator)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        return Conditioning(pe, torch.zeros_like(pe), attention_mask=mask,
                            negative_attention_mask=mask.clone())
    width = getattr(cfg, "cross_attention_dim", None)
    pe = None if width is None else torch.randn(batch, text_len, width, generator=generator)
    cl = ncl = None
    if getattr(cfg, "class_embed_type", None) == "projection":
        cl = torch.randn(batch, cfg.projection_class_embeddings_input_dim, generator=generator)
        ncl = torch.zeros_like(cl)
    elif getattr(cfg, "num_class_embeds", None):
        cl = torch.zeros(batch, dtype=torch.long)
        ncl = torch.full((batch,), cfg.num_class_embeds - 1, dtype=torch.long)
    added = nadded = None
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
        added = {"text_embeds": torch.randn(batch, pooled, generator=generator), "time_ids": time_ids}
        nadded = {"text_embeds": torch.zeros(batch, pooled), "time_ids": time_ids.clone()}
    return Conditioning(pe, None if pe is None else torch.zeros_like(pe), cl, ncl, added, nadded)
