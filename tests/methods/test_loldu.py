"""LoLDU: frozen LU factors of W0, only the diagonal z trains (spec: shared/methods/loldu.md)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.loldu import ldu

from ..conftest import tiny_gpt2, tiny_llama

CASES = {"loldu": {"r": 16, "alpha": 16.0}}
VARIANTS = [
    ("loldu", {"r": 4}),  # the code's from_linear defaults: alpha 1, s = 1/r
    ("loldu", {"r": 8, "init": "uniform", "seed": 3}),  # starts away from the base, as in the code
]
TRAIN_LR = {"loldu": 1e-1}  # z is a scale vector of small pivots: Adam moves W by about s·lr per step


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def dense_weight(adapter, layer, z=None):
    """W_res + s·P L_r diag(z) U_r, the official code's dense effective weight."""
    z = adapter.z if z is None else z
    return adapter.residual(layer) + ((adapter.lower * (adapter.scale * z)) @ adapter.upper)[adapter.perm]


@pytest.mark.parametrize("shape", [(16, 32), (48, 32), (32, 32)])
def test_ldu_reconstructs_the_weight(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    perm, lower, diag, upper = ldu(weight)
    k = min(shape)
    assert lower.shape == (shape[0], k) and upper.shape == (k, shape[1])
    rebuilt = ((lower * diag) @ upper)[perm]
    assert (rebuilt - weight).norm() / weight.norm() < 1e-5
    assert torch.equal(lower.diagonal(), torch.ones(k)) and torch.allclose(upper.diagonal(), torch.ones(k))
    assert torch.equal(lower, lower.tril()) and torch.equal(upper, upper.triu())
    assert lower.abs().max() <= 1 + 1e-6  # partial pivoting
    assert torch.equal(torch.sort(perm).values, torch.arange(shape[0]))  # a permutation, stored as indices
    dense_p, _, _ = torch.linalg.lu(weight)
    assert torch.equal(dense_p @ torch.eye(shape[0]), torch.eye(shape[0])[perm])


def test_init_is_the_base_and_the_merged_weight_is_w0():
    model = peftlab.adapt(tiny_llama(), "loldu", r=8)
    x = torch.randn(2, 5, 32)
    for layer, adapter in adapters_of(model):
        assert torch.equal(adapter.z, adapter.d0)
        assert torch.allclose(dense_weight(adapter, layer), weight_matrix(layer), atol=1e-5)
        assert torch.count_nonzero(adapter.delta_weight(layer)) == 0
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        adapted = layer(x)
        with peftlab.disabled(model):
            assert torch.equal(layer(x), adapted)


def test_only_z_trains_and_its_gradient_matches_the_formula():
    model = peftlab.adapt(tiny_llama(), "loldu", r=8, alpha=2.0)
    layer, adapter = adapters_of(model)[0]
    assert [n for n, p in adapter.named_parameters()] == ["z"]
    assert not any(b.requires_grad for b in adapter.buffers())
    assert peftlab.LoLDU(r=4).trainable_count(4096, 4096) == 4
    assert peftlab.LoLDU(r=4096).trainable_count(4096, 4096) == 4096
    assert peftlab.trainable_parameter_count(model) == 8 * len(adapters_of(model))
    x = torch.randn(3, 4, layer.in_features, generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, 4, layer.out_features, generator=torch.Generator().manual_seed(2))
    (layer(x) * g).sum().backward()
    p = torch.eye(layer.out_features)[adapter.perm]
    expected = adapter.scale * ((x @ adapter.upper.T) * (g @ p @ adapter.lower)).sum((0, 1))
    assert torch.allclose(adapter.z.grad, expected, rtol=1e-4, atol=1e-6)


def test_fast_path_equals_the_dense_weight_after_perturbing_z():
    model = peftlab.adapt(tiny_llama(), "loldu", r=16, alpha=4.0)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for layer in (mlp.down_proj, attn.k_proj):  # 48 -> 32 (tall LU, r < k); 32 -> 16 (wide, full rank)
        adapter = layer.peftlab["default"]
        with torch.no_grad():
            adapter.z.mul_(1 + 0.5 * torch.randn(16, generator=torch.Generator().manual_seed(0)))
            dense = dense_weight(adapter, layer)
            x = torch.randn(2, 3, layer.in_features)  # few tokens: the factored path
            assert torch.allclose(layer(x), x @ dense.T, atol=1e-5)
            assert torch.allclose(weight_matrix(layer) + adapter.delta_weight(layer), dense, atol=1e-6)
    calls = []
    adapter.delta_weight = lambda layer: calls.append(1) or type(adapter).delta_weight(adapter, layer)
    with torch.no_grad():
        many = torch.randn(4, 20, 32)  # 80 tokens at full rank: ΔW is materialised once per forward
        assert torch.allclose(attn.k_proj(many), many @ dense.T, atol=1e-5) and calls == [1]


def test_full_rank_residual_is_scaled_w0():
    model = peftlab.adapt(tiny_llama(), "loldu", r=16, alpha=1.0, targets=["k_proj"])  # 32 -> 16: k = 16
    for layer, adapter in adapters_of(model):
        assert torch.allclose(adapter.residual(layer), (1 - 1 / 16) * weight_matrix(layer), atol=1e-6)


def test_gpt2_conv1d_uses_the_out_in_matrix():
    model = peftlab.adapt(tiny_gpt2(), "loldu", r=8)
    layer = model.transformer.h[0].attn.c_attn  # Conv1D, stored (in, out) = (32, 96)
    adapter = layer.peftlab["default"]
    assert adapter.lower.shape == (96, 8) and adapter.upper.shape == (8, 32)
    with torch.no_grad():
        adapter.z.add_(0.1)
        x = torch.randn(2, 3, 32)
        assert torch.allclose(layer(x), x @ dense_weight(adapter, layer).T + layer.bias, atol=1e-5)


def test_random_inits_keep_the_residual_and_use_a_local_generator():
    a, b = tiny_llama(), tiny_llama()  # building a tiny model seeds the global RNG
    state = torch.random.get_rng_state()
    peftlab.adapt(a, "loldu", r=8, init="s_uniform", seed=5)
    peftlab.adapt(b, "loldu", r=8, init="s_uniform", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seeded init leaves the global RNG alone
    za, zb = adapters_of(a)[0][1].z, adapters_of(b)[0][1].z
    assert torch.equal(za, zb) and za.abs().max() <= 1
    for layer, adapter in adapters_of(peftlab.adapt(tiny_llama(), "loldu", r=8, init="ones")):
        assert torch.equal(adapter.z, torch.ones(8))
        assert torch.allclose(adapter.delta_weight(layer), dense_weight(adapter, layer) - weight_matrix(layer),
                              atol=1e-5)
    assert not peftlab.LoLDU(init="ones").identity_at_init and peftlab.LoLDU().identity_at_init


def test_config_errors():
    for bad in ({"r": 0}, {"r": 2.5}, {"alpha": 0}, {"init": "kaiming"}, {"seed": "x"}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.LoLDU(**bad)
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(model, "loldu", r=20)  # k, v: 32 -> 16
    assert not peftlab.adapters(model)


def test_zero_pivot_is_refused():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 0] = 0  # the first pivot column is zero
    with pytest.raises(peftlab.ConfigError, match="pivot"):
        peftlab.adapt(model, "loldu", r=4, targets=["layers.0.self_attn.q_proj"])
