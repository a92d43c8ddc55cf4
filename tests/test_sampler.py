"""The batched engine against the per-sample reference (reference.sample_one), and its guarantees."""

import pytest
import torch
from conftest import NUM_CLASSES, SAFETY_NET, make_cond, rel_err

from fgds_engine.conditioning import Conditioning
from fgds_engine.criteria import CRITERIA, get_criterion
from fgds_engine.reference_loop import sample_one
from fgds_engine.sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig

LABELS, SEEDS = [0, 3, 5, 9], [10, 11, 12, 13]
TOL = 1e-4  # relative error, fp32 on CPU: batched vs per-sample convolutions differ only by rounding


def _config(**kw):
    base = dict(num_inference_steps=8, feedback_every=3, feedback_scale=0.1, criterion="entropy")
    return SamplerConfig.faithful(**{**base, **kw})


def _check_against_reference(m, cfg, cond, labels=LABELS, seeds=SEEDS, stats=None):
    out = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg, stats=stats).sample(
        cond, labels, seeds)
    for i, (y, s) in enumerate(zip(labels, seeds)):
        lat, img, crit = sample_one(m.unet, m.vae, m.classifier, m.scheduler, cfg, cond.select(i), y, s,
                                    stats=stats)
        assert rel_err(out.latents[i], lat[0]) < TOL, f"sample {i}"
        assert rel_err(out.images[i], img[0]) < TOL, f"sample {i}"
        assert abs(out.criterion[i].item() - crit.item()) <= TOL * abs(crit.item())
    assert not out.nan.any()
    return out


# the criterion contract: every per-sample criterion equals the reference batched; the batch-level ones
# (a sample depends on its batch by design) have their rows in test_guidance_terms.py
PER_SAMPLE = [c.name for c in CRITERIA.values() if c.per_sample]
BATCH_LEVEL_ROWS = {"feature-repulsion": "test_guidance_terms.py::test_repulsion_criterion_is_batch_level_"
                                         "and_runs_whole_batches"}


def test_every_declared_criterion_has_a_contract_row():
    assert set(PER_SAMPLE) | set(BATCH_LEVEL_ROWS) == set(CRITERIA)
    assert not set(PER_SAMPLE) & set(BATCH_LEVEL_ROWS)


@pytest.mark.parametrize("criterion", PER_SAMPLE)
@pytest.mark.parametrize("mode", ["shift", "score"])
def test_batched_equals_reference(tiny, tiny_stats, criterion, mode):
    cfg = _config(criterion=criterion, feedback_mode=mode)
    stats = tiny_stats if get_criterion(criterion).needs_stats else None
    out = _check_against_reference(tiny, cfg, make_cond(4), stats=stats)
    # the comparison is not vacuous: feedback moved every sample well beyond the tolerance
    plain = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                  _config(feedback_scale=0.0)).sample(make_cond(4), LABELS, SEEDS)
    for i in range(4):
        assert rel_err(out.latents[i], plain.latents[i]) > 100 * TOL


def test_x0_grad_path_equals_reference(tiny):
    """x0 path: the engine's normalised dC/ds equals the reference's dC/dx with the UNet output held fixed."""
    _check_against_reference(tiny, _config(grad_path="x0", criterion="loss"), make_cond(4))


def test_eta_noise_equals_reference(tiny):
    _check_against_reference(tiny, _config(eta=0.8, feedback_mode="score"), make_cond(4))


def test_no_cfg_equals_reference(tiny):
    _check_against_reference(tiny, _config(guidance_scale=1.0), make_cond(4))


def test_image_embedding_dropout_equals_reference(tiny_unclip):
    cond = make_cond(4, image_embed_dim=12)
    cfg = _config(embedding_dropout=0.5)
    _check_against_reference(tiny_unclip, cfg, cond, seeds=[3, 4, 5, 7])
    dropped = []
    for s in [3, 4, 5, 7]:  # each sample's generator: initial noise first, then the dropout coin
        g = torch.Generator().manual_seed(s)
        torch.randn((4, 8, 8), generator=g)
        dropped.append(bool(torch.rand((), generator=g) < 0.5))
    assert dropped == [False, False, True, False], "the batch mixes dropped and kept embeddings"
    # the dropped sample equals a run without dropout whose embedding is the unconditional (zero) one
    m = tiny_unclip
    zeroed = Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, cond.class_labels.clone())
    zeroed.class_labels[2] = 0
    a = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg).sample(cond, [0] * 4,
                                                                                    [3, 4, 5, 7])
    b = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, _config(embedding_dropout=0.0)
                              ).sample(zeroed, [0] * 4, [3, 4, 5, 7])
    assert torch.equal(a.latents[2], b.latents[2]) and rel_err(a.latents[0], b.latents[0]) < 1e-5
    assert rel_err(a.latents[1], b.latents[1]) < 1e-5


def test_pixel_space_equals_reference(tiny_pixel):
    _check_against_reference(tiny_pixel, _config(criterion="loss"), make_cond(4))


def test_channels_last_equals_reference():
    from fgds_engine.models import tiny_models

    plain = tiny_models(num_classes=NUM_CLASSES)  # a fresh copy: channels_last converts the models in place
    cfg = _config(criterion="loss")
    out = FeedbackGuidedSampler(plain.unet, plain.vae, plain.classifier, plain.scheduler, cfg,
                                runtime=RuntimeOptions(channels_last=True)).sample(
        make_cond(2), [1, 2], [3, 4])
    ref = tiny_models(num_classes=NUM_CLASSES)
    for i in range(2):
        lat, _, _ = sample_one(ref.unet, ref.vae, ref.classifier, ref.scheduler, cfg, make_cond(2).select(i),
                               i + 1, i + 3)
        assert rel_err(out.latents[i], lat[0]) < TOL


def test_sample_in_batch_equals_sample_alone(tiny):
    cfg = _config(criterion="loss")
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, cfg)
    cond = make_cond(5)
    batch = sampler.sample(cond, [1, 2, 3, 4, 5], [20, 21, 22, 23, 24])
    alone = sampler.sample(cond.select(3), [4], [23])
    assert rel_err(batch.latents[3], alone.latents[0]) < 1e-5
    assert abs(batch.criterion[3].item() - alone.criterion[0].item()) < 1e-5


def test_same_seed_is_bit_identical(tiny):
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config(eta=0.5))
    a = sampler.sample(make_cond(3), [1, 2, 3], [7, 8, 9])
    b = sampler.sample(make_cond(3), [1, 2, 3], [7, 8, 9])
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert torch.equal(a.criterion, b.criterion)


def test_latent_output_type(tiny):
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config())
    out = sampler.sample(make_cond(2), [1, 2], [7, 8], output_type="latent")
    assert out.images is None and out.criterion is None and out.latents.shape == (2, 4, 8, 8)
    full = sampler.sample(make_cond(2), [1, 2], [7, 8])
    assert torch.equal(out.latents, full.latents)
    assert full.images.shape == (2, 3, 16, 16) and 0 <= full.images.min() and full.images.max() <= 1


def test_nan_latents_are_flagged_per_sample(tiny):
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config())
    cond = make_cond(3)
    poisoned = Conditioning(cond.prompt_embeds.clone(), cond.negative_prompt_embeds)
    poisoned.prompt_embeds[1] = float("nan")
    out = sampler.sample(poisoned, [1, 2, 3], [7, 8, 9])
    assert out.nan.tolist() == [False, True, False]
    assert torch.isnan(out.images[1]).all(), "a NaN sample must not be clamped into a black image"
    clean = sampler.sample(cond.select([0, 2]), [1, 3], [7, 9])
    assert rel_err(out.latents[[0, 2]], clean.latents) < 1e-5


class _MinusInfClass(torch.nn.Module):
    """Wraps a classifier and appends a class whose logit is -inf (its cross-entropy is infinite)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes + 1

    def forward(self, x):
        logits = self.inner(x)
        return torch.cat([logits, torch.full_like(logits[:, :1], float("-inf"))], dim=1)


def test_infinite_criterion_is_flagged(tiny):
    clf = _MinusInfClass(tiny.classifier)
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, clf, tiny.scheduler,
                                    _config(criterion="loss", feedback_scale=0.0))
    out = sampler.sample(make_cond(2), [NUM_CLASSES, 1], [7, 8])
    assert out.nan.tolist() == [True, False]
    assert torch.isinf(out.criterion[0]) and torch.isfinite(out.criterion[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=[0, 10]), "label 10 is out of the classifier's range 0..9"),
    (dict(labels=[0, -1]), "label -1 is out of the classifier's range 0..9"),
    (dict(seeds=[1, 2, 3]), "batch size mismatch: cond has 2 rows, labels 2, seeds 3"),
    (dict(labels=[1]), "batch size mismatch: cond has 2 rows, labels 1, seeds 2"),
    (dict(output_type="pil"), "output_type must be 'pt' or 'latent', got 'pil'"),
])
def test_bad_input_messages(tiny, kwargs, message):
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config())
    args = dict(labels=[0, 1], seeds=[1, 2]) | kwargs
    output_type = args.pop("output_type", "pt")
    with pytest.raises(ValueError) as err:
        sampler.sample(make_cond(2), args["labels"], args["seeds"], output_type=output_type)
    assert str(err.value) == message


def test_config_and_construction_errors(tiny, tiny_stats):
    with pytest.raises(ValueError) as err:
        SamplerConfig(criterion="margin")
    assert str(err.value) == ("unknown criterion 'margin'; choose one of loss, entropy, hardness, "
                              "feature-repulsion")
    with pytest.raises(ValueError) as err:
        FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                              _config(criterion="hardness"))
    assert str(err.value) == "criterion 'hardness' needs GaussianClassStats (stats=...)"
    with pytest.raises(ValueError, match="feedback_mode must be one of"):
        SamplerConfig(feedback_mode="push")
    with pytest.raises(ValueError) as err:
        RuntimeOptions(backend="numba")
    assert str(err.value) == "backend must be one of ('torch', 'triton', 'cuda', 'auto'), got 'numba'"


def test_auto_backend_on_cpu_is_torch_and_logged(tiny, caplog):
    with caplog.at_level("INFO", logger="fgds_engine.sampler"):
        sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, _config())
    assert sampler.backend == "torch"
    assert "fused DDIM step backend: torch (auto on cpu: the fused kernels need a CUDA device)" in caplog.text


def test_classifier_size_mismatch(tiny):
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, img_size=32,
                            dynamic_img_size=False)
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, vit, tiny.scheduler, _config())
    with pytest.raises(ValueError) as err:
        sampler.sample(make_cond(1), [0], [1])
    assert str(err.value) == ("the classifier expects 32x32 inputs but receives 16x16 images; "
                              "set classifier_size=32 to resize (changes the samples)")
    resized = FeedbackGuidedSampler(tiny.unet, tiny.vae, vit, tiny.scheduler, _config(classifier_size=32))
    out = resized.sample(make_cond(2), [1, 2], [3, 4])
    ref = sample_one(tiny.unet, tiny.vae, vit, tiny.scheduler, resized.config, make_cond(2).select(1), 2, 4)
    assert rel_err(out.latents[1], ref[0][0]) < TOL


@pytest.mark.parametrize("dtype,tol", [("float16", 3e-2), ("bfloat16", 5e-2)])
def test_half_precision_close_to_fp32(dtype, tol):
    """dtype casts the models; norms, min/max and the step stay fp32 (measured: 0.9% fp16, 1.2% bf16)."""
    from fgds_engine.models import tiny_models

    half, full = tiny_models(num_classes=NUM_CLASSES), tiny_models(num_classes=NUM_CLASSES)
    a = FeedbackGuidedSampler(half.unet, half.vae, half.classifier, half.scheduler, _config(),
                              runtime=RuntimeOptions(dtype=dtype)).sample(make_cond(2), [1, 2], [3, 4])
    b = FeedbackGuidedSampler(full.unet, full.vae, full.classifier, full.scheduler, _config()
                              ).sample(make_cond(2), [1, 2], [3, 4])
    assert a.latents.dtype == getattr(torch, dtype) and not a.nan.any()
    assert rel_err(a.latents.float(), b.latents) < tol
    assert rel_err(a.images, b.images) < tol / 2


PEFT_SCRIPT = """
import sys
if sys.argv[2] == "blocked":
    sys.modules["peft"] = None  # as a machine without PEFT: find_spec gives None
import torch
import diffusers.utils
from conftest import make_cond
from fgds_engine.models import tiny_models
from fgds_engine.sampler import FeedbackGuidedSampler, SamplerConfig
m = tiny_models(num_classes=10, seed=0)
cfg = SamplerConfig.faithful(num_inference_steps=4, feedback_every=2, feedback_scale=0.1)
sampler = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg)
out = sampler.sample(make_cond(2), [1, 2], [3, 4])
torch.save({"peft": diffusers.utils.USE_PEFT_BACKEND, "latents": out.latents}, sys.argv[1])
"""


def test_samples_are_the_same_with_and_without_peft(tmp_path):
    """The lent GPU machine has PEFT, and diffusers then routes every UNet forward through its layer scaling;
    the test extras install PEFT so that the whole suite runs that path. Here: with PEFT and without it
    (blocked in a subprocess), the engine gives bit-identical samples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    got, procs = {}, {}
    for how in ("installed", "blocked"):  # both at once (one thread each): two cores, half the wait
        procs[how] = subprocess.Popen([sys.executable, "-c", PEFT_SCRIPT, str(tmp_path / f"{how}.pt"), how],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for how, proc in procs.items():
        _, err = proc.communicate(timeout=SAFETY_NET)
        assert proc.returncode == 0, err[-2000:]
        got[how] = torch.load(tmp_path / f"{how}.pt")
    assert got["installed"]["peft"] is True and got["blocked"]["peft"] is False
    assert torch.equal(got["installed"]["latents"], got["blocked"]["latents"])
