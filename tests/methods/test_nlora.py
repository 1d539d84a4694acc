"""NLoRA / SLoRA / IntTune: LoRA with an r x r middle matrix (spec: shared/methods/nlora.md)."""

from __future__ import annotations

import math

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix

from ..conftest import make_inputs, output_of, tiny_gpt2, tiny_llama

CASES = {"nlora": {"r": 8, "alpha": 8.0}}
VARIANTS = [
    ("nlora", {"r": 8, "alpha": 8.0, "variant": "slora"}),
    ("nlora", {"r": 8, "alpha": 64.0, "variant": "inttune"}),  # W0 blocks are ~0.02: a larger s lets N move W
    ("nlora", {"r": 8, "alpha": 1.0, "residual": True, "nystrom_pinv": True}),  # N = pinv(W0 block) ~ 1/|W0|: small s
    ("nlora", {"r": 8, "alpha": 64.0, "variant": "inttune", "residual": True}),
]
TRAIN_LR = {"nlora": 1e-2}


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def test_nlora_init_copies_the_leading_blocks_of_w0():
    model = peftlab.adapt(tiny_llama(), "nlora", r=8, alpha=4.0)
    for layer, adapter in adapters_of(model):
        w = weight_matrix(layer).detach()
        assert torch.equal(adapter.lora_A, w[:8, :]) and torch.equal(adapter.lora_B, w[:, :8])
        assert torch.equal(adapter.lora_N, w[:8, :8])
        expected = 0.5 * w[:, :8] @ w[:8, :8] @ w[:8, :]
        assert torch.allclose(adapter.delta_weight(layer), expected, atol=1e-7)
    assert not peftlab.NLoRA().identity_at_init


def test_nlora_blocks_of_gpt2_conv1d_come_from_the_out_in_matrix():
    model = peftlab.adapt(tiny_gpt2(), "nlora", r=8)
    layer = model.transformer.h[0].attn.c_attn  # stored (in, out) = (32, 96)
    adapter = layer.peftlab["default"]
    assert adapter.lora_B.shape == (96, 8) and torch.equal(adapter.lora_B, layer.weight.T[:, :8])


def test_slora_starts_at_the_base_and_only_b_gets_a_first_gradient():
    model, inputs = tiny_llama(), make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "nlora", r=8, alpha=8.0, variant="slora", seed=0)
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    for _, adapter in adapters_of(model):
        assert torch.count_nonzero(adapter.lora_B) == 0
        assert adapter.lora_A.abs().max() <= 1 / math.sqrt(adapter.lora_A.shape[1])
        assert adapter.lora_N.abs().max() <= 1 / math.sqrt(8)
        assert adapter.lora_N.abs().max() > 0.5 / math.sqrt(8)  # Kaiming-uniform, not a tiny normal
    output_of(model, inputs).pow(2).mean().backward()
    for _, adapter in adapters_of(model):
        assert torch.count_nonzero(adapter.lora_A.grad) == 0 and torch.count_nonzero(adapter.lora_N.grad) == 0
    assert any(torch.count_nonzero(a.lora_B.grad) > 0 for _, a in adapters_of(model))


def test_slora_seed_is_local_and_reproducible():
    a, b = tiny_llama(), tiny_llama()
    state = torch.random.get_rng_state()
    peftlab.adapt(a, "nlora", r=8, variant="slora", seed=3)
    peftlab.adapt(b, "nlora", r=8, variant="slora", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    (_, x), (_, y) = adapters_of(a)[0], adapters_of(b)[0]
    assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.lora_N, y.lora_N)
    assert not torch.equal(adapters_of(a)[0][1].lora_N, adapters_of(a)[1][1].lora_N)  # per-layer streams


def test_inttune_trains_only_the_middle():
    model, inputs = tiny_llama(), make_inputs("llama")
    peftlab.adapt(model, "nlora", r=8, alpha=8.0, variant="inttune")
    pairs = adapters_of(model)
    assert peftlab.trainable_parameter_count(model) == 64 * len(pairs)
    for _, adapter in pairs:
        assert [n for n, _ in adapter.named_parameters()] == ["lora_N"]
        assert set(adapter.state_dict()) == {"lora_N"}  # A and B are recomputed from W0 on load
    before = {id(a): (a.lora_A.clone(), a.lora_B.clone(), a.lora_N.detach().clone()) for _, a in pairs}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    for _, adapter in pairs:
        a, b, n = before[id(adapter)]
        assert torch.equal(adapter.lora_A, a) and torch.equal(adapter.lora_B, b)
        assert not torch.equal(adapter.lora_N, n)
    assert peftlab.NLoRA(variant="inttune").derives_from_weights


def test_trainable_counts_on_a_7b_layer():
    assert peftlab.NLoRA(r=128).trainable_count(4096, 4096) == 1_064_960
    assert peftlab.NLoRA(r=128, variant="slora").trainable_count(4096, 4096) == 1_064_960
    assert peftlab.NLoRA(r=128, variant="inttune").trainable_count(4096, 4096) == 16_384
    # LLaMA-2-7B: 7 projections x 32 layers of IntTune middles = the paper's "3.67M additional"
    inttune = peftlab.NLoRA(r=128, variant="inttune")
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    assert 32 * sum(inttune.trainable_count(i, o) for i, o in shapes) == 3_670_016


@pytest.mark.parametrize("variant", ["nlora", "slora", "inttune"])
def test_merge_equals_unmerged(variant):
    model, inputs = tiny_llama(), make_inputs("llama")
    peftlab.adapt(model, "nlora", r=8, alpha=8.0, variant=variant)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        adapted = output_of(model, inputs)
        peftlab.merge(model)
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)


def test_pinv_and_residual_options():
    model = peftlab.adapt(tiny_llama(), "nlora", r=8, alpha=8.0, nystrom_pinv=True)
    layer, adapter = adapters_of(model)[0]
    w = weight_matrix(layer).detach()
    product = adapter.lora_B @ adapter.lora_N @ adapter.lora_A  # Nyström: C W11⁺ R
    assert torch.allclose(product[:8], w[:8], atol=1e-4) and torch.allclose(product[:, :8], w[:, :8], atol=1e-4)
    model, inputs = tiny_llama(), make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "nlora", r=8, alpha=8.0, residual=True)
    assert peftlab.adapters(model)["default"].identity_at_init
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    assert all(torch.count_nonzero(a.delta_weight(m)) == 0 for m, a in adapters_of(model))


def test_export_as_plain_lora(tmp_path):
    for options in ({}, {"residual": True}):
        model, inputs = tiny_llama(), make_inputs("llama")
        peftlab.adapt(model, "nlora", r=8, alpha=8.0, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.1)
            adapted = output_of(model, inputs)
        peftlab.export(model, tmp_path / str(len(options)))
        fresh = peftlab.load(tiny_llama(), tmp_path / str(len(options)))
        assert peftlab.adapters(fresh)["default"].name == "lora"
        with torch.no_grad():
            assert torch.allclose(output_of(fresh, inputs), adapted, atol=1e-5)


def test_config_errors():
    for bad in ({"r": 0}, {"variant": "plain"}, {"dropout": 1.0}, {"variant": "slora", "residual": True},
                {"variant": "slora", "nystrom_pinv": True}, {"alpha": 0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.NLoRA(**bad)
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(tiny_llama(), "nlora", r=20)
