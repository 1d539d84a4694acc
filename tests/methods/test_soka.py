"""SoKA: KPSVD-initialised sum of Kronecker factors over a frozen residual (spec: shared/methods/soka.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.soka import balanced_split, kpsvd, rearrange, select_rank

from ..conftest import adapter_of, make_inputs, one_layer, output_of, perturb_adapters, rel_err, tiny_gpt2, tiny_llama

CASES = {"soka": {}}  # the energy/elbow rule with its defaults (r_max 8) fits the tiny layers
VARIANTS = [("soka", {"r": 2}), ("soka", {"r_max": 3, "tau": 0.5, "factor_shapes": {"*": [2, 2]}})]
TRAIN_LR = {"soka": 1e-2}


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def kron_sum(a, b):
    """Σ_k a_k ⊗ b_k as a dense matrix, with torch.kron: the reference the fast paths are checked against."""
    return sum(torch.kron(ak, bk) for ak, bk in zip(a, b))


def test_rearrangement_matches_torch_kron_and_full_kpsvd_reconstructs():
    u, v = torch.randn(3, 4, generator=gen(0)), torch.randn(5, 2, generator=gen(1))
    assert torch.equal(rearrange(torch.kron(u, v), 3, 4, 5, 2), torch.outer(u.reshape(-1), v.reshape(-1)))
    w = torch.randn(15, 8, generator=gen(2))  # out = 3·5, in = 4·2
    sigma, us, vs = kpsvd(w, 3, 4, 5, 2)
    assert sigma.numel() == min(12, 10)
    rebuilt = sum(s * torch.kron(a, b) for s, a, b in zip(sigma, us, vs))
    assert (rebuilt - w).norm() / w.norm() < 1e-5


def test_truncation_error_is_the_tail_energy():
    w = torch.randn(32, 48, generator=gen(3))
    sigma, us, vs = kpsvd(w, 4, 6, 8, 8)
    for r in (1, 3, 7):
        approx = sum(s * torch.kron(a, b) for s, a, b in zip(sigma[:r], us[:r], vs[:r]))
        assert torch.allclose((w - approx).pow(2).sum(), sigma[r:].pow(2).sum(), rtol=1e-4)


def test_balanced_shapes():
    assert balanced_split(4096) == (64, 64) and balanced_split(11008) == (86, 128)
    soka = peftlab.SoKA(r=4)
    assert soka.shapes(4096, 4096) == (64, 64, 64, 64)
    assert soka.shapes(4096, 11008) == (86, 64, 128, 64)  # gate/up: out 11008 = 86·128, in 4096 = 64·64
    assert soka.trainable_count(4096, 4096) == 32_768  # 64x64 ⊗ 64x64, r_kp = 4
    assert peftlab.SoKA().trainable_count(4096, 4096) is None  # r_kp depends on the weights
    override = peftlab.SoKA(r=1, factor_shapes={"q": [32, 128], "4096x4096": [16, 16]})
    assert override.shapes(4096, 4096, "q") == (32, 128, 128, 32)
    assert override.shapes(4096, 4096, "k") == (16, 16, 256, 256)


def test_init_is_the_base_and_merged_weight_is_w0():
    model, inputs = tiny_llama(), make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "soka")
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    for layer, adapter in adapters_of(model):
        w = weight_matrix(layer).detach()
        w_res = w - kron_sum(adapter.base_A, adapter.base_B)
        assert torch.allclose(w_res + kron_sum(adapter.kron_A, adapter.kron_B), w, atol=1e-6)
        assert torch.count_nonzero(adapter.delta_weight(layer)) == 0
        assert 1 <= adapter.rank <= 8


def test_forward_equals_dense_after_perturbing():
    model = peftlab.adapt(tiny_llama(), "soka", r=3)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    for layer in (attn.q_proj, mlp.gate_proj, mlp.down_proj):  # square, wide and tall splits
        adapter = layer.peftlab["default"]
        with torch.no_grad():
            adapter.kron_A.add_(0.1 * torch.randn(adapter.kron_A.shape, generator=gen(4)))
            adapter.kron_B.mul_(1.5)
            w = weight_matrix(layer)
            dense = w - kron_sum(adapter.base_A, adapter.base_B) + kron_sum(adapter.kron_A, adapter.kron_B)
            x = torch.randn(2, 5, layer.in_features, generator=gen(5))
            assert torch.allclose(layer(x), x @ dense.T, atol=1e-5)
            assert torch.allclose(w + adapter.delta_weight(layer), dense, atol=1e-6)
    gpt2 = peftlab.adapt(tiny_gpt2(), "soka", r=2)
    layer = gpt2.transformer.h[0].attn.c_attn  # Conv1D: (out, in) = (96, 32) -> 8x4 ⊗ 12x8
    adapter = layer.peftlab["default"]
    assert adapter.shape == (8, 4, 12, 8)
    with torch.no_grad():
        adapter.kron_B.add_(0.2)
        x = torch.randn(3, 32, generator=gen(6))
        assert torch.allclose(layer(x), x @ (layer.weight.T + adapter.delta_weight(layer)).T + layer.bias, atol=1e-5)


def test_forward_and_gradients_match_the_spec_formula():
    """y = W_res x + b + Σ_k vec(Â_k X B̂_kᵀ) (the spec's einsum), W_res = W0 − Σ_k Â0_k ⊗ B̂0_k: outputs and
    the gradients of x and both factors, away from init, in fp32."""
    model = peftlab.adapt(one_layer(24, 40), "soka", r=3)
    layer, adapter = model[0], adapter_of(model)
    assert adapter.shape == (5, 4, 8, 6)  # 40 = 5·8, 24 = 4·6
    perturb_adapters(model)
    a, b = (t.detach().clone().requires_grad_() for t in (adapter.kron_A, adapter.kron_B))
    x = torch.randn(3, 7, 24, generator=gen(8), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_res = layer.weight.detach() - kron_sum(adapter.base_A, adapter.base_B)
    terms = torch.einsum("kmn,...nq,kpq->...mp", a, x_ref.reshape(3, 7, 4, 6), b).reshape(3, 7, 40)
    expected = x_ref @ w_res.T + layer.bias.detach() + terms
    out = model(x)
    probe = torch.randn(expected.shape, generator=gen(9))
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    assert rel_err(out, expected) < 1e-6
    for got, want in ((x.grad, x_ref.grad), (adapter.kron_A.grad, a.grad), (adapter.kron_B.grad, b.grad)):
        assert rel_err(got, want) < 1e-6


def test_rank_rule_on_synthetic_spectra():
    # σ² = 100, 49, 1, ...: cumulative energy 0.656, 0.977, 0.983, ...; the chord gap peaks at k = 3
    sigma = torch.tensor([10.0, 7.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert select_rank(sigma, 0.9, 8) == 2  # energy 0.93 at k = 2, elbow at k = 3 (σ drops after 7)
    assert select_rank(sigma, 0.5, 8) == 1  # energy alone: σ_1² = 100 / 152.55 > 0.5
    assert select_rank(sigma, 0.99, 8) == 3  # energy needs 5 terms; the elbow stops at 3
    assert select_rank(sigma, 0.99, 2) == 2  # r_max caps it
    flat = torch.ones(6)
    assert select_rank(flat, 1.0, 8) == 1  # no elbow on a flat spectrum: all gaps are 0 -> k = 1


def test_trainable_count_follows_the_selected_ranks():
    model = peftlab.adapt(tiny_llama(), "soka", tau=0.9, r_max=8)
    expected = 0
    for layer, adapter in adapters_of(model):
        m, n, p, q = adapter.shape
        sigma = kpsvd(weight_matrix(layer).detach().float(), m, n, p, q)[0]
        assert adapter.rank == select_rank(sigma, 0.9, 8)
        expected += adapter.rank * (m * n + p * q)
    assert peftlab.trainable_parameter_count(model) == expected


def test_awkward_sizes_are_refused_or_warned():
    with pytest.raises(peftlab.ConfigError, match="no non-trivial"):
        peftlab.SoKA().shapes(4099, 4096)  # 4099 is prime
    with pytest.raises(peftlab.ConfigError, match="does not divide"):
        peftlab.SoKA(factor_shapes={"*": [5, 4]}).shapes(32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.SoKA().shapes(64, 2 * 1009)  # in = 2·1009: a 2 x 1009 split
    assert any("unbalanced" in str(w.message) for w in caught)


def test_config_errors():
    for bad in ({"tau": 0.0}, {"tau": 1.5}, {"r_max": 0}, {"r": 0}, {"factor_shapes": {"q": [4]}},
                {"factor_shapes": [4, 4]}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.SoKA(**bad)
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(tiny_llama(), "soka", r=17)  # q: 4x4 ⊗ 8x8 has 16 terms
