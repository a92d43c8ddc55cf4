"""Feedback: the guidance component, passed into the sampler as guided-diffusion passes ``cond_fn``.

From latents x_t to dC/dx_t of a per-sample criterion C (docs/method.md, "Generation (per sample)", step 2):
    x0 = predicted clean latents from eps (of the prediction type), s = sqrt(1 - a) x0 + (1 - sqrt(1 - a)) x
    img = decode(s) in [0, 1], min-max per sample (detached bounds); C = criterion(classifier(norm(img)))
``gradient(x, a_t, labels, eps)`` returns (eps_c, dC/dx): ``eps`` is a callable x -> eps (the full path:
the gradient runs back through the UNet) or a tensor (the x0 path: the UNet output held constant).
``score(images, labels)`` is the criterion of finished images (no min-max, no gradient).

A new criterion is a subclass that overrides ``criterion(images01, labels)`` (per-sample fp32 values that
feedback increases); everything else -- decoding, preprocessing, the fp16 underflow guard, both gradient
paths -- is inherited. The sampler never knows which criterion it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRAD_PATHS, FeedbackOptions
from .criteria import GaussianClassStats, criterion_values, get_criterion
from .models import Classifier, decode
from .ops import split_prediction


def scaled_for_backward(c: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_i w_i c_i with w_i = scale / |c_i| (fp32, detached; scale 0: plain sum).

    Every sample's backward then starts at the same magnitude, so an fp16 classifier / decoder / UNet backward
    does not flush a small criterion's gradient to zero. Any positive per-sample weight cancels in the
    per-sample normalisation of the feedback gradient: the samples do not change beyond rounding.
    """
    if not scale:
        return c.sum()
    return (c.float() * (scale / c.detach().float().abs().clamp_min(1e-30))).sum()


class Feedback:
    """The classifier criterion (loss / entropy / hardness) and its gradient with respect to the latents.

    Args:
        classifier: an ``nn.Module`` giving logits (or a ``models.Classifier``).
        vae: the diffusers AutoencoderKL that decodes latents, or None in pixel space.
        options: ``FeedbackOptions`` (``SamplerConfig.feedback_options``): the criterion (a name in
            ``criteria.CRITERIA``: "loss" | "entropy" | "hardness", which needs ``stats`` | "repulsion",
            batch-level), the gradient path ("full": through UNet, decoder and classifier; "x0": UNet output
            held constant), the classifier's input size (None: as they are) and normalisation.
        stats: ``GaussianClassStats`` or ``LowRankClassStats`` of the penultimate features (hardness).
        prediction_type: the UNet's, to form x0 from its output.
        grad_scale: the fp16 underflow guard (see ``scaled_for_backward``; ``RuntimeOptions.grad_scale``);
            None: 1024 for fp16 models.
    """

    def __init__(self, classifier: nn.Module, vae: nn.Module | None, options: FeedbackOptions | None = None,
                 *, stats: GaussianClassStats | None = None, prediction_type: str = "epsilon",
                 grad_scale: float | None = None):
        self.options = o = options or FeedbackOptions()
        criterion, grad_path = o.criterion, o.grad_path
        if grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path must be one of {GRAD_PATHS}, got {grad_path!r}")
        self.classifier = classifier if isinstance(classifier, Classifier) else Classifier(classifier)
        self.vae, self.criterion_name, self.stats = vae, criterion, stats
        self.grad_path, self.prediction_type = grad_path, prediction_type
        self.classifier_size = o.classifier_size
        self.mean = torch.tensor(o.classifier_mean).view(1, -1, 1, 1)
        self.std = torch.tensor(o.classifier_std).view(1, -1, 1, 1)
        self.grad_scale = grad_scale
        self.declared = get_criterion(criterion)  # what it needs: features, statistics, the whole batch
        if self.declared.needs_stats:
            if stats is None:
                raise ValueError(f"criterion {criterion!r} needs GaussianClassStats (stats=...)")
            if stats.num_classes != self.classifier.num_classes:
                raise ValueError(f"hardness statistics cover {stats.num_classes} classes but the classifier "
                                 f"has {self.classifier.num_classes}")

    @classmethod
    def from_config(cls, classifier, vae, config, runtime=None, *, stats=None,
                    prediction_type: str = "epsilon") -> Feedback:
        """The component a ``SamplerConfig`` (and ``RuntimeOptions``, for its fp16 guard) describes."""
        return cls(classifier, vae, config.feedback_options, stats=stats, prediction_type=prediction_type,
                   grad_scale=None if runtime is None else runtime.grad_scale)

    def to(self, device) -> Feedback:
        """Move the normalisation constants and statistics to ``device`` (the models are the caller's)."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.stats is not None:
            self.stats = self.stats.to(device)
        return self

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The models it runs (the sampler freezes them for the duration of a call)."""
        return (self.classifier,) if self.vae is None else (self.vae, self.classifier)

    # ------------------------------------------------------------------ the two calls

    def gradient(self, x: torch.Tensor, a_t: torch.Tensor, labels: torch.Tensor, eps):
        """(eps_c detached, dC/dx): eps is a callable x -> eps (full path) or a tensor (x0 path)."""
        if not callable(eps):  # x0 path: dC/dx = (positive per-step scalar) dC/ds, equal once normalised
            x0 = split_prediction(eps, x, a_t, self.prediction_type)[0]
            s = self.blend(x0, x, a_t).detach().requires_grad_()
            with torch.enable_grad():
                c = self.guided_criterion(s, labels, x.dtype)
                grad = torch.autograd.grad(self._scaled(c, x.dtype), s)[0]
            return eps, grad
        xg = x.detach().requires_grad_()
        with torch.enable_grad():
            eps_c = eps(xg)
            x0 = split_prediction(eps_c, xg, a_t, self.prediction_type)[0]
            c = self.guided_criterion(self.blend(x0, xg, a_t), labels, x.dtype)
            grad = torch.autograd.grad(self._scaled(c, x.dtype), xg)[0]
        return eps_c.detach(), grad

    def score(self, images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The criterion of finished images in [0, 1] (fp32 [B]); no gradient is kept."""
        with torch.no_grad():
            return self.criterion(images01, labels)

    # ------------------------------------------------------------------ the parts a subclass may change

    def criterion(self, images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample criterion (fp32 [B]) of images in [0, 1]: classifier input preprocessing, then loss /
        entropy / hardness of its logits (or penultimate features)."""
        size = self.classifier_size
        if size is not None and images01.shape[-1] != size:
            images01 = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False)
        inp = ((images01 - self.mean) / self.std).to(next(self.classifier.parameters()).dtype)
        features = self.declared.needs_features
        out = self.classifier(inp, with_features=features)
        logits, feats = out if features else (out, None)
        return criterion_values(self.criterion_name, logits, labels, feats, self.stats)

    @staticmethod
    def blend(x0: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """s = sqrt(1 - a_t) x0 + (1 - sqrt(1 - a_t)) x (inherited from diffusers' CLIP-guided pipeline)."""
        fac = (1 - a_t.to(x0.device)).sqrt()
        return fac * x0 + (1 - fac) * x.float()

    def guided_criterion(self, s: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Criterion of latents s (decoded in ``dtype``): [-1, 1] -> [0, 1], per-sample min-max with
        detached bounds."""
        img = decode(self.vae, s.to(dtype)).float() / 2 + 0.5
        img = img - img.amin(dim=(1, 2, 3), keepdim=True).detach()
        img = img / img.amax(dim=(1, 2, 3), keepdim=True).detach()
        return self.criterion(img, labels)

    def _scaled(self, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = self.grad_scale
        if scale is None:
            scale = 1024.0 if dtype == torch.float16 else 0.0
        return scaled_for_backward(c, scale)
