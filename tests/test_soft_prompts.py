"""Prompt, P-tuning and prefix tuning with padding, labels and the generation cache."""

from __future__ import annotations

import pytest
import torch

import peftlab

from .conftest import VOCAB, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
METHODS = [("prompt", {"num_virtual_tokens": 3}), ("ptuning", {"num_virtual_tokens": 3}),
           ("prefix", {"num_virtual_tokens": 3}), ("prefix", {"num_virtual_tokens": 3, "projection": 8})]


def adapted(kind, method, options):
    model = MODELS[kind]()
    torch.manual_seed(0)
    peftlab.adapt(model, method, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def greedy_without_cache(model, ids, mask, steps):
    """Reference decoding: the whole sequence re-run each step, no KV cache."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method, options", METHODS, ids=lambda c: str(c))
def test_generate_with_cache_equals_recomputation(kind, method, options):
    model = adapted(kind, method, options)
    ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = greedy_without_cache(model, ids, mask, steps=6)
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method, options", METHODS, ids=lambda c: str(c))
def test_left_padding_does_not_change_a_sequence(method, options):
    model = adapted("llama", method, options)
    ids = torch.randint(3, VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        with_pad = model(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits
    assert with_pad.shape == (1, 9, VOCAB)
    assert torch.allclose(with_pad[:, 3:], alone, atol=1e-5)


@pytest.mark.parametrize("method, options", METHODS, ids=lambda c: str(c))
def test_internal_loss_ignores_virtual_positions(method, options):
    model = adapted("llama", method, options)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_prefix_on_an_encoder_is_attended_to_and_keeps_padding_masked():
    from .conftest import tiny_bert

    model = tiny_bert()
    peftlab.adapt(model, "prefix", num_virtual_tokens=4)  # K/V probed through a cache handed to BERT
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    other = ids.clone()
    other[0, :3] = (ids[0, :3] + 1) % VOCAB
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        repadded = model(input_ids=other, attention_mask=mask).last_hidden_state
        with peftlab.disabled(model):
            base = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out[0, 3:], repadded[0, 3:], atol=1e-6) and torch.allclose(out[1], repadded[1])
    assert (out - base).abs().amax() > 1e-2


def test_prompt_init_from_token_ids():
    model = tiny_llama()
    peftlab.adapt(model, "prompt", num_virtual_tokens=4, init_token_ids=(5, 6))
    prompt = dict(model.named_parameters())["model.peftlab.default.prompt"]
    embedding = model.get_input_embeddings().weight
    assert torch.equal(prompt, embedding[[5, 6, 5, 6]])
