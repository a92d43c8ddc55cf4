"""The guidance-term contract: every term (``fgds_engine.terms``) has one row here and passes the same checks,
the way every diffusers scheduler runs ``SchedulerCommonTest``:

1. the term moves the samples (the other checks are not vacuous);
2. a sample in a batch equals the sample alone (a batch-level term: a rerun is bit-identical and a permuted
   batch gives the permuted samples);
3. the graph stand-in replays bit-identically to eager;
4. at its neutral value the term gives the bytes of its absence.

A new term is one file (or, as ``TowardsZero`` below, one class) plus its row in ``ROWS``.
"""

import pytest
import torch
from conftest import make_cond, rel_err

from fgds_engine.conditioning import Conditioning
from fgds_engine.graphs import EagerStandIn, StepGraphs
from fgds_engine.models import tiny_flow_pipeline
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
from fgds_engine.terms import (
    CADS,
    ClassifierFreeGuidance,
    FeedbackTerm,
    GuidanceTerm,
    Repulsion,
    SkipLayerGuidance,
)

STEPS = 6
TOL = 1e-4  # fp32 on the CPU: batch = alone, permutation (reductions in another order)


class TowardsZero(GuidanceTerm):
    """A toy push term of a user's own: pull every sample towards the origin, on every step."""

    name = "towards-zero"

    def __init__(self, scale: float):
        self.scale = scale

    def pushes(self, i):
        return self.scale != 0

    def push(self, s, model_grad):
        return -s.x.float()


# name -> (the term at a value, the value that moves, its neutral value)
ROWS = {
    "cfg": (lambda v: ClassifierFreeGuidance(v), 3.0, 1.0),
    "cfg-interval": (lambda v: ClassifierFreeGuidance(v, (0.5, 3.0)), 3.0, 1.0),
    "cads": (lambda v: CADS(v), (0.3, 0.8), (0.9999, 1.0)),
    "feedback": (lambda v: FeedbackTerm(v, 2, None, STEPS), 0.05, 0.0),
    "repulsion": (lambda v: Repulsion(v, 2, None, STEPS), 0.1, 0.0),
    "towards-zero": (lambda v: TowardsZero(v), 0.05, 0.0),
}
# terms that need a transformer family's denoiser: their rows run on the tiny SD3 pipeline's transformer
TRANSFORMER_ROWS = {
    "skip-layers": (lambda v: SkipLayerGuidance([0], v, 0.0, 1.0, STEPS), 2.8, 0.0),
}


def _engine(tiny, terms=(), scheduler="ddim"):
    """CFG off in the config, so that the rows add every term themselves (the cfg row included)."""
    cfg = SamplerConfig(num_inference_steps=STEPS, scheduler=scheduler, guidance_scale=1.0,
                        feedback_scale=0.0, embedding_dropout=0.0)
    return FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg, terms=list(terms))


def test_every_term_of_the_package_has_a_row():
    import fgds_engine.terms as t

    shipped = {c.name for c in vars(t).values() if isinstance(c, type) and issubclass(c, GuidanceTerm)
               and c is not GuidanceTerm}
    assert shipped == {"cfg", "cads", "feedback", "repulsion", "skip-layers"}
    rows = {**ROWS, **TRANSFORMER_ROWS}
    assert {rows[r][0](rows[r][1]).name for r in rows} == shipped | {TowardsZero.name}


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("row", list(ROWS))
def test_term_contract(tiny, row, scheduler):
    make, value, neutral = ROWS[row]
    cond, labels, seeds = make_cond(3), [2, 2, 5], [11, 12, 13]
    term = make(value)
    absent = _engine(tiny, scheduler=scheduler).sample(cond, labels, seeds)
    out = _engine(tiny, [term], scheduler).sample(cond, labels, seeds)
    # 1. it moves the samples
    assert rel_err(out.latents, absent.latents) > 1e-3
    # 2. batch = alone (batch-level: rerun and permutation)
    if term.per_sample:
        alone = _engine(tiny, [make(value)], scheduler).sample(cond.select([1]), labels[1:2], seeds[1:2])
        assert rel_err(out.latents[1], alone.latents[0]) < TOL
    else:
        again = _engine(tiny, [make(value)], scheduler).sample(cond, labels, seeds)
        assert torch.equal(again.latents, out.latents)
        p = [2, 0, 1]
        perm = _engine(tiny, [make(value)], scheduler).sample(cond.select(p), [labels[i] for i in p],
                                                              [seeds[i] for i in p])
        assert rel_err(perm.latents, out.latents[p]) < TOL
    # 3. the graph stand-in = eager, bit for bit
    graphed = _engine(tiny, [make(value)], scheduler)
    graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
    got = graphed.sample(cond, labels, seeds)
    assert torch.equal(got.latents, out.latents) and torch.equal(got.images, out.images)
    # 4. the neutral value = the term absent, bit for bit
    off = _engine(tiny, [make(neutral)], scheduler).sample(cond, labels, seeds)
    assert torch.equal(off.latents, absent.latents) and torch.equal(off.images, absent.images)


def test_terms_are_refused_when_two_share_a_name_or_two_push_through_the_model(tiny):
    with pytest.raises(ValueError, match="^guidance term names must be unique, got cfg, towards-zero, cfg$"):
        _engine(tiny, [ClassifierFreeGuidance(3.0), TowardsZero(0.1), ClassifierFreeGuidance(2.0)])

    class Other(FeedbackTerm):
        name = "other-feedback"

    with pytest.raises(ValueError, match="^at most one guidance term may push through the model pass$"):
        _engine(tiny, [FeedbackTerm(0.1, 2, None, STEPS), Other(0.1, 2, None, STEPS)])


def test_the_config_builds_its_terms_and_leaves_neutral_ones_out(tiny):
    s = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, SamplerConfig(
        num_inference_steps=STEPS, guidance_scale=1.0, feedback_scale=0.0))
    assert [t.name for t in s.terms] == []
    s = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, SamplerConfig(
        num_inference_steps=STEPS, cads=(0.6, 0.9), repulsion_scale=0.02, cfg_interval=(0.3, 5.0)),
        terms=[TowardsZero(0.1)])
    assert [t.name for t in s.terms] == ["cfg", "cads", "feedback", "repulsion", "towards-zero"]
    assert s.terms.get("cfg").interval == (0.3, 5.0) and s.terms.get("feedback").every == 5


@pytest.fixture(scope="module")
def sd3():
    return tiny_flow_pipeline("sd3")


def _sd3_engine(pipe, classifier, terms=(), scheduler=None):
    """CFG on (skip-layer guidance acts on the steps that run the unconditional half)."""
    cfg = SamplerConfig(num_inference_steps=STEPS, scheduler=scheduler, guidance_scale=4.0,
                        feedback_scale=0.0, embedding_dropout=0.0, image_size=16)
    return FeedbackGuidedSampler(pipe.transformer, pipe.vae, classifier, pipe.scheduler, cfg,
                                 terms=list(terms))


@pytest.mark.parametrize("row", list(TRANSFORMER_ROWS))
def test_transformer_term_contract(sd3, tiny, row):
    """The same four checks on a transformer family (flow-euler and flow-dpmpp-2m): the term moves the
    samples, batch = alone, the graph stand-in replays bit-identically, the neutral value is its absence."""
    make, value, neutral = TRANSFORMER_ROWS[row]
    with torch.no_grad():
        pe, npe, pooled, npooled = sd3.encode_prompt(prompt=["a cat", "a dog", "a bird"], prompt_2=None,
                                                     prompt_3=None, do_classifier_free_guidance=True)
    cond = Conditioning(pe, npe, pooled_projections=pooled, negative_pooled_projections=npooled)
    labels, seeds = [2, 2, 5], [11, 12, 13]
    for scheduler in ("flow-euler", "flow-dpmpp-2m"):
        absent = _sd3_engine(sd3, tiny.classifier, scheduler=scheduler).sample(cond, labels, seeds)
        out = _sd3_engine(sd3, tiny.classifier, [make(value)], scheduler).sample(cond, labels, seeds)
        assert rel_err(out.latents, absent.latents) > 1e-3
        alone = _sd3_engine(sd3, tiny.classifier, [make(value)], scheduler).sample(
            cond.select([1]), labels[1:2], seeds[1:2])
        assert rel_err(out.latents[1], alone.latents[0]) < TOL
        graphed = _sd3_engine(sd3, tiny.classifier, [make(value)], scheduler)
        graphed.graphs = StepGraphs(graph_factory=EagerStandIn)
        got = graphed.sample(cond, labels, seeds)
        assert torch.equal(got.latents, out.latents)
        assert {k[0] for k in graphed.graphs.entries} == {"passes", row}  # step 0: n * start < i fails
        off = _sd3_engine(sd3, tiny.classifier, [make(neutral)], scheduler).sample(cond, labels, seeds)
        assert torch.equal(off.latents, absent.latents)


def test_skip_layer_guidance_is_refused_where_it_cannot_act(sd3, tiny):
    with pytest.raises(ValueError) as err:
        _engine(tiny, [SkipLayerGuidance([0])])  # the fused DDIM step forms no output to adjust
    assert str(err.value) == ("skip-layers adjusts the model output, which the fused DDIM step never forms: "
                              "pick a scheduler that runs its own step (SamplerConfig(scheduler=...))")
    with pytest.raises(ValueError) as err:
        _engine(tiny, [SkipLayerGuidance([0], 2.8, 0.0, 1.0, STEPS)], "euler").sample(
            make_cond(1), [1], [1])
    assert str(err.value) == ("skip-layer guidance skips transformer layers: UNet2DConditionModel takes no "
                              "skip_layers (SD3's transformer does)")
