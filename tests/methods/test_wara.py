"""WaRA: low-rank map of one-level DWT subbands, reconstructed by the inverse DWT (arXiv 2506.24092)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.inject import hosts
from peftlab.methods.wara import dwt, dwt_matrix, idwt, wavelet_filters

from ..conftest import tiny_llama

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
