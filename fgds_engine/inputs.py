"""The checks of a sampling call's inputs, each one line naming the bad value."""

from __future__ import annotations

import torch

from .conditioning import Conditioning
from .models import vae_scale_factor


def check_sample_inputs(sampler, cond, labels, seeds, output_type) -> torch.Tensor:
    """The labels as a long tensor on the sampler's device, after checking the batch against the sampler's
    classifier, image size and VAE."""
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
    if not isinstance(cond, Conditioning):
        raise ValueError(f"cond must be a Conditioning, got {type(cond).__name__}")
    labels = torch.as_tensor(labels).reshape(-1)
    seeds = list(seeds)
    if not (len(cond) == len(labels) == len(seeds)):
        raise ValueError(f"batch size mismatch: cond has {len(cond)} rows, labels {len(labels)}, "
                         f"seeds {len(seeds)}")
    if labels.is_floating_point() or not all(isinstance(s, int) for s in seeds):
        raise ValueError("labels and seeds must be integers")
    n = sampler.classifier.num_classes
    bad = labels[(labels < 0) | (labels >= n)]
    if len(bad):
        raise ValueError(f"label {int(bad[0])} is out of the classifier's range 0..{n - 1}")
    want = sampler.classifier.input_size
    size = sampler.config.classifier_size or sampler.image_size
    if want is not None and want != (size, size):
        raise ValueError(f"the classifier expects {want[0]}x{want[1]} inputs but receives {size}x{size} "
                         f"images; set classifier_size={want[0]} to resize (changes the samples)")
    if sampler.image_size % vae_scale_factor(sampler.vae):
        raise ValueError(f"image_size {sampler.image_size} is not a multiple of the VAE factor "
                         f"{vae_scale_factor(sampler.vae)}")
    return labels.to(sampler.device, torch.long)
