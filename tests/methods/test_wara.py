"""WaRA: low-rank map of one-level DWT subbands, reconstructed by the inverse DWT (arXiv 2506.24092)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.inject import hosts
from peftlab.methods.wara import dwt, dwt_matrix, idwt, wavelet_filters

from ..conftest import assert_same_function, made_by_fold, tiny_llama

CASES = {"wara": {"r": 4}}
VARIANTS = [("wara", {"r": 4, "wavelet": "db2", "dropout": 0.0})]


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def reference_delta(adapter) -> torch.Tensor:
    """s · Σ_a G_aᵀ (B A) F_a with dense analysis matrices (the paper's W⁻¹(B A W(x)) on the feature axis)."""
    name = "haar" if adapter.low == wavelet_filters("haar")[0] else "db2"
    n_in, n_out = 2 * adapter.half_in, 2 * adapter.half_out
    f, g = dwt_matrix(n_in, name), dwt_matrix(n_out, name)
    m = (adapter.lora_B.detach() @ adapter.lora_A.detach()).double()
    hi, ho = adapter.half_in, adapter.half_out
    delta = g[:ho].T @ m @ f[:hi] + g[ho:].T @ m @ f[hi:]
    return adapter.scale * delta[: adapter.fan_out, : adapter.fan_in]


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters_of(model):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen))


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_filter_bank_is_an_orthogonal_dwt(wavelet):
    low, high = wavelet_filters(wavelet)
    assert abs(sum(low) - 2**0.5) < 1e-12 and abs(sum(high)) < 1e-12
    f = dwt_matrix(16, wavelet)
    assert torch.allclose(f @ f.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(dwt(x, low, high).reshape(3, 16), x @ f.T, atol=1e-12)
    assert torch.allclose(idwt(dwt(x, low, high), low, high), x, atol=1e-12)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_fast_path_equals_the_dense_wavelet_domain_update(wavelet):
    model = peftlab.adapt(tiny_llama(), "wara", r=4, wavelet=wavelet, dropout=0.0)
    randomise(model)
    for layer, adapter in adapters_of(model):
        delta = reference_delta(adapter)
        assert torch.allclose(adapter.delta_weight(layer).double(), delta, atol=1e-5)
        x = torch.randn(2, 3, adapter.fan_in)
        with torch.no_grad():
            assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight + delta.float()), atol=1e-5)


def reference_factors(adapter, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, s·B̂) from dense float64 analysis matrices: rows A F_lo, A F_hi and columns s·G_loᵀ B, s·G_hiᵀ B,
    interleaved per rank, cropped to the layer's sizes."""
    name = "haar" if adapter.low == wavelet_filters("haar")[0] else "db2"
    hi, ho = adapter.half_in, adapter.half_out
    f, g = dwt_matrix(2 * hi, name), dwt_matrix(2 * ho, name)
    a_hat = torch.stack((a @ f[:hi], a @ f[hi:]), dim=1).flatten(end_dim=1)
    b_hat = adapter.scale * torch.stack((g[:ho].T @ b, g[ho:].T @ b), dim=2).flatten(start_dim=1)
    return a_hat[:, : adapter.fan_in], b_hat[: adapter.fan_out]


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
@pytest.mark.parametrize("sizes", [(16, 12), (17, 13), (8, 9)])
def test_folded_factors_and_their_gradients_match_the_dense_transforms(wavelet, sizes):
    model = nn.Sequential(nn.Linear(*sizes))
    peftlab.adapt(model, "wara", r=3, targets=["0"], wavelet=wavelet, dropout=0.0)
    randomise(model)
    _, adapter = adapters_of(model)[0]
    a, b = adapter.folded_factors()
    a64 = adapter.lora_A.detach().double().requires_grad_()
    b64 = adapter.lora_B.detach().double().requires_grad_()
    ref_a, ref_b = reference_factors(adapter, a64, b64)
    assert a.dtype == b.dtype == torch.float32 and a.shape == ref_a.shape and b.shape == ref_b.shape
    assert torch.allclose(a.double(), ref_a, atol=1e-6) and torch.allclose(b.double(), ref_b, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    cot_a, cot_b = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
    ((a * cot_a).sum() + (b * cot_b).sum()).backward()
    ((ref_a * cot_a.double()).sum() + (ref_b * cot_b.double()).sum()).backward()
    assert torch.allclose(adapter.lora_A.grad.double(), a64.grad, atol=1e-5)
    assert torch.allclose(adapter.lora_B.grad.double(), b64.grad, atol=1e-5)


@pytest.mark.parametrize("tokens, folds", [((4, 8), True), ((1, 2), False)])
def test_forward_and_gradients_match_the_dense_transforms(tokens, folds):
    """y = (W0 + s·Σ_a G_aᵀ B A F_a) x + b against float64 dense transforms (the factors are built in fp32), in
    the layer's own product for enough tokens."""
    model = nn.Sequential(nn.Linear(17, 13))
    peftlab.adapt(model, "wara", r=3, targets=["0"], wavelet="db2", dropout=0.0).double()
    randomise(model)
    layer, adapter = adapters_of(model)[0]
    a64, b64 = (p.detach().clone().requires_grad_() for p in (adapter.lora_A, adapter.lora_B))
    ref_a, ref_b = reference_factors(adapter, a64, b64)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*tokens, 17, generator=gen, dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = nn.functional.linear(x_ref, layer.weight + ref_b @ ref_a, layer.bias)
    out = model(x_got)
    assert made_by_fold(out) == folds
    assert_same_function(out, expected, ((x_got, x_ref), (adapter.lora_A, a64), (adapter.lora_B, b64)), gen,
                         tol=1e-5)


def test_haar_reduces_to_a_kronecker_factor_in_the_interleaved_layout():
    model = peftlab.adapt(tiny_llama(), "wara", r=4)
    randomise(model)
    layer, adapter = adapters_of(model)[0]
    m = adapter.scale * adapter.lora_B.detach() @ adapter.lora_A.detach()
    assert torch.allclose(adapter.delta_weight(layer), torch.kron(m, torch.eye(2)), atol=1e-6)


def test_odd_sizes_are_padded_and_cropped():
    model = nn.Sequential(nn.Linear(33, 31))
    peftlab.adapt(model, "wara", r=3, targets=["0"], wavelet="db2")
    randomise(model)
    layer, adapter = adapters_of(model)[0]
    assert adapter.lora_A.shape == (3, 17) and adapter.lora_B.shape == (16, 3)
    assert torch.allclose(adapter.delta_weight(layer).double(), reference_delta(adapter), atol=1e-5)
    assert peftlab.trainable_parameter_count(model) == peftlab.WaRA(r=3).trainable_count(33, 31) == 3 * 33


def test_counts_and_errors():
    config = peftlab.WaRA()
    assert config.trainable_count(4096, 4096) == 8 * (2048 + 2048) == 32_768
    per_layer = 4 * 32_768 + 2 * config.trainable_count(4096, 11008) + config.trainable_count(11008, 4096)
    assert per_layer * 32 == 9_994_240
    with pytest.raises(peftlab.ConfigError, match="wavelet"):
        peftlab.WaRA(wavelet="sym4")
    with pytest.raises(peftlab.ConfigError, match="at least 4"):
        peftlab.adapt(nn.Sequential(nn.Linear(3, 8)), "wara", targets=["0"], wavelet="db2")
