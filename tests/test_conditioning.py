"""Conditioning: batch checks, CFG pairs, per-sample embedding dropout."""

import pytest
import torch

from fgds_engine.conditioning import Conditioning


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_dropout_is_per_sample_and_batch_independent():
    emb = torch.randn(6, 4)
    cond = Conditioning(class_labels=emb)
    batch = cond.with_embedding_dropout(_gens(range(6)), 0.5)
    coins = [torch.rand((), generator=torch.Generator().manual_seed(s)).item() < 0.5 for s in range(6)]
    for i in range(6):
        alone = cond.select(i).with_embedding_dropout(_gens([i]), 0.5)
        assert torch.equal(batch.class_labels[i], alone.class_labels[0])
        assert torch.equal(batch.class_labels[i], torch.zeros(4) if coins[i] else emb[i])
    assert 0 < sum(coins) < 6


def test_dropout_uses_negative_embedding_and_p_bounds():
    emb, neg = torch.randn(3, 4), torch.randn(3, 4)
    cond = Conditioning(class_labels=emb, negative_class_labels=neg)
    assert torch.equal(cond.with_embedding_dropout(_gens([1, 2, 3]), 1.0).class_labels, neg)
    gens = _gens([1, 2, 3])
    assert cond.with_embedding_dropout(gens, 0.0) is cond
    assert [g.initial_seed() for g in gens] == [1, 2, 3] and torch.rand((), generator=gens[0]).item() == \
        torch.rand((), generator=torch.Generator().manual_seed(1)).item(), "p=0 draws nothing"


def test_dropout_without_cfg_needs_no_negative_prompt():
    """Dropout only needs the unconditional image embedding, not a negative prompt (guidance_scale <= 1)."""
    emb = torch.randn(2, 4)
    cond = Conditioning(torch.randn(2, 3, 4), None, emb)
    assert torch.equal(cond.with_embedding_dropout(_gens([1, 2]), 1.0).class_labels, torch.zeros(2, 4))


def test_errors():
    with pytest.raises(ValueError) as err:
        Conditioning(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    assert str(err.value) == ("Conditioning tensors disagree on the batch size: "
                              "{'prompt_embeds': 2, 'negative_prompt_embeds': 3}")
    with pytest.raises(ValueError) as err:
        Conditioning()
    assert str(err.value) == "Conditioning needs prompt_embeds or class_labels"
    with pytest.raises(ValueError) as err:
        Conditioning(torch.zeros(2, 3, 4)).unconditional()
    assert str(err.value) == "classifier-free guidance needs negative_prompt_embeds (encode an empty prompt)"
    with pytest.raises(ValueError) as err:
        Conditioning(class_labels=torch.tensor([1, 2])).unconditional()
    assert str(err.value) == ("classifier-free guidance with integer class_labels needs "
                              "negative_class_labels (the null class)")
    with pytest.raises(ValueError) as err:
        Conditioning(class_labels=torch.tensor([1, 2])).with_embedding_dropout(_gens([1, 2]), 0.5)
    assert str(err.value) == ("embedding_dropout applies to image embeddings, but class_labels holds integer "
                              "classes; set embedding_dropout=0")


def test_unconditional_pairs():
    pe, npe, cl = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 5)
    u = Conditioning(pe, npe, cl).unconditional()
    assert torch.equal(u.prompt_embeds, npe) and torch.equal(u.class_labels, torch.zeros(2, 5))
    ints = Conditioning(class_labels=torch.tensor([3, 4]), negative_class_labels=torch.tensor([10, 10]))
    assert ints.unconditional().class_labels.tolist() == [10, 10]
