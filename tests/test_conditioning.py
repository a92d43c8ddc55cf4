"""Conditioning: batch checks, CFG pairs, per-sample embedding dropout, the UNet keywords (SDXL's nested
added_cond_kwargs included)."""

import pytest
import torch

from fgds_engine.conditioning import Conditioning, cfg_kwargs, random_conditioning


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


def _sdxl_cond(batch=3):
    g = torch.Generator().manual_seed(0)
    pe, npe = torch.randn(batch, 4, 8, generator=g), torch.zeros(batch, 4, 8)
    ids = torch.arange(batch * 6, dtype=torch.float32).view(batch, 6)
    added = {"text_embeds": torch.randn(batch, 5, generator=g), "time_ids": ids}
    return Conditioning(pe, npe, added_cond_kwargs=added,
                        negative_added_cond_kwargs={"text_embeds": torch.zeros(batch, 5), "time_ids": ids})


def test_added_cond_kwargs_rows_flat_names_and_the_unet_keywords():
    cond = _sdxl_cond()
    assert sorted(cond.flat()) == ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids",
                                   "negative_added_cond_kwargs.text_embeds",
                                   "negative_added_cond_kwargs.time_ids", "negative_prompt_embeds",
                                   "prompt_embeds"]
    back = Conditioning.from_flat(cond.flat())
    assert all(torch.equal(a, b) for a, b in zip(back.flat().values(), cond.flat().values()))
    sel = cond.select([2, 0])
    assert torch.equal(sel.added_cond_kwargs["time_ids"], cond.added_cond_kwargs["time_ids"][[2, 0]])
    assert torch.equal(sel.negative_added_cond_kwargs["text_embeds"], torch.zeros(2, 5))
    kw = cond.model_kwargs()
    assert sorted(kw) == ["added_cond_kwargs", "encoder_hidden_states"]
    assert kw["added_cond_kwargs"]["text_embeds"] is cond.added_cond_kwargs["text_embeds"]
    both = cfg_kwargs(cond.unconditional(), cond)  # [uncond; cond], row-wise, nested dicts included
    assert torch.equal(both["encoder_hidden_states"], torch.cat([cond.negative_prompt_embeds,
                                                                 cond.prompt_embeds]))
    assert torch.equal(both["added_cond_kwargs"]["text_embeds"],
                       torch.cat([torch.zeros(3, 5), cond.added_cond_kwargs["text_embeds"]]))
    half = cond.to("cpu", torch.float16)
    assert half.added_cond_kwargs["time_ids"].dtype == torch.float16


def test_added_cond_kwargs_errors():
    cond = _sdxl_cond()
    no_negative = ("^classifier-free guidance needs negative_added_cond_kwargs \\(SDXL: the negative pooled "
                   "text embedding and the time ids\\)$")
    with pytest.raises(ValueError, match=no_negative):
        Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds,
                     added_cond_kwargs=cond.added_cond_kwargs).unconditional()
    with pytest.raises(ValueError, match="^Conditioning tensors disagree on the batch size: "):
        Conditioning(cond.prompt_embeds, added_cond_kwargs={"time_ids": torch.zeros(2, 6)})
    halves = ("^the unconditional half feeds \\['encoder_hidden_states'\\], the conditional half "
              "\\['added_cond_kwargs', 'encoder_hidden_states'\\]$")
    with pytest.raises(ValueError, match=halves):
        cfg_kwargs(Conditioning(cond.negative_prompt_embeds), cond)


def test_random_conditioning_follows_the_unet_config():
    from types import SimpleNamespace

    sdxl = SimpleNamespace(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=40, class_embed_type=None,
                           num_class_embeds=None)
    c = random_conditioning(sdxl, 2, 7)
    assert c.prompt_embeds.shape == (2, 7, 32) and c.added_cond_kwargs["text_embeds"].shape == (2, 16)
    assert c.added_cond_kwargs["time_ids"].tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2
    assert not c.negative_added_cond_kwargs["text_embeds"].any()
    classes = SimpleNamespace(cross_attention_dim=None, class_embed_type=None, num_class_embeds=11)
    c = random_conditioning(classes, 3)
    assert c.prompt_embeds is None and c.negative_class_labels.tolist() == [10, 10, 10]
