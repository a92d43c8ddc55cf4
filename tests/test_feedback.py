"""The feedback component: its two calls against the sampler's use, a criterion of one's own, and the
sampler leaving the caller's models as it found them."""

import pytest
import torch
from conftest import make_cond, rel_err

from fgds_engine.config import FeedbackOptions
from fgds_engine.feedback import Feedback
from fgds_engine.models import tiny_models
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig

LABELS, SEEDS = [0, 3, 5], [10, 11, 12]


def _cfg(**kw):
    base = dict(num_inference_steps=6, feedback_every=1, feedback_scale=0.2)
    return SamplerConfig.faithful(**{**base, **kw})


class Brightness(Feedback):
    """A criterion of one's own: mean pixel value (feedback makes images brighter)."""

    def criterion(self, images01, labels):
        return images01.float().mean(dim=(1, 2, 3))


def test_a_criterion_of_ones_own_steers_the_samples(tiny):
    cfg = _cfg()
    plain = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                  _cfg(feedback_scale=0))
    bright = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg,
                                   feedback=Brightness.from_config(tiny.classifier, tiny.vae, cfg))
    a, b = plain.sample(make_cond(3), LABELS, SEEDS), bright.sample(make_cond(3), LABELS, SEEDS)
    assert torch.equal(b.criterion, b.images.mean(dim=(1, 2, 3)))  # score() is the component's criterion
    gain = b.images.mean(dim=(1, 2, 3)) - a.images.mean(dim=(1, 2, 3))
    assert (gain > 0.01).all(), gain  # every sample brighter than unguided


def test_gradient_and_score_are_what_the_sampler_uses(tiny):
    """The component's gradient through the UNet equals the sampler's feedback pass; score equals the
    sampler's final criterion."""
    s = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _cfg())
    fb = Feedback(tiny.classifier, tiny.vae, FeedbackOptions(criterion="entropy"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *s.latent_shape, generator=g)
    cond = make_cond(3)
    t, a_t = s.solver.schedule.timesteps[1], s.solver.schedule.alphas(1)[0]
    labels = torch.tensor(LABELS)
    from fgds_engine.models import denoiser_output

    eps_c, grad = fb.gradient(x, a_t, labels,
                              lambda xg: denoiser_output(tiny.unet, xg, t, cond.prompt_embeds))
    _, want_eps, want_grad = s.feedback_pass(x, t, a_t, cond, cond.unconditional(), labels)
    assert rel_err(eps_c, want_eps) < 1e-6 and rel_err(grad, want_grad) < 1e-6 and grad.abs().max() > 0
    out = s.sample(cond, LABELS, SEEDS)
    assert torch.equal(fb.score(out.images, labels), out.criterion)


def test_x0_path_holds_the_unet_output_constant(tiny):
    fb = Feedback(tiny.classifier, tiny.vae, FeedbackOptions(criterion="loss", grad_path="x0"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn_like(x)
    got_eps, grad = fb.gradient(x, torch.tensor(0.5), torch.tensor([1, 2]), eps)
    assert got_eps is eps and grad.shape == x.shape and grad.abs().max() > 0
    with pytest.raises(ValueError, match="grad_path must be one of"):
        Feedback(tiny.classifier, tiny.vae, FeedbackOptions(grad_path="unet"))


def test_the_sampler_leaves_the_callers_models_as_it_found_them():
    """A UNet in training keeps training after a preview: modes and requires_grad flags are restored, and
    during the call the models ran in eval mode without parameter gradients (same samples as frozen ones)."""
    m = tiny_models(seed=3)
    m.unet.train().requires_grad_(True)
    m.classifier.train()
    before = {name: [p.requires_grad for p in mod.parameters()] for name, mod in
              (("unet", m.unet), ("vae", m.vae), ("classifier", m.classifier))}
    seen = []
    m.unet.register_forward_pre_hook(lambda mod, args: seen.append(
        (mod.training, any(p.requires_grad for p in mod.parameters()))))
    s = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _cfg())
    assert m.unet.training and m.classifier.training  # construction changes nothing
    got = s.sample(make_cond(3), LABELS, SEEDS)
    assert seen and set(seen) == {(False, False)}  # every UNet call of the sampling ran frozen
    assert m.unet.training and m.classifier.training and not m.vae.training
    after = {name: [p.requires_grad for p in mod.parameters()] for name, mod in
             (("unet", m.unet), ("vae", m.vae), ("classifier", m.classifier))}
    assert after == before
    frozen = tiny_models(seed=3)  # the loaders' models are frozen already: the same samples
    want = FeedbackGuidedSampler(frozen.unet, frozen.vae, frozen.classifier, frozen.scheduler,
                                 _cfg()).sample(make_cond(3), LABELS, SEEDS)
    assert torch.equal(got.latents, want.latents)
