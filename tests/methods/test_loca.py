"""LoCA: iDCT of a sparse spectrum at learned locations (arXiv 2502.06820; no spec file, see loca.py)."""

from __future__ import annotations

import math

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.method import TrainingStep
from peftlab.methods.loca import dct_matrix, dct_rows

from ..conftest import assert_same_function, made_by_fold, make_inputs, tiny_llama

CASES = {"loca": {"n_frequency": 64}}
VARIANTS = [
    ("loca", {"n_frequency": 64, "forward": "dense"}),
    ("loca", {"n_frequency": 40, "scale": 2.0, "dropout": 0.1}),
]


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def dense_delta(adapter) -> torch.Tensor:
    """The official ``ori_idct2d``: α · C_outᵀ S C_in with dense DCT matrices (fp64)."""
    rows, cols = adapter.indices()
    spectrum = torch.zeros(adapter.fan_out, adapter.fan_in, dtype=torch.float64)
    spectrum.index_put_((rows, cols), adapter.spectrum.detach().double(), accumulate=True)
    return adapter.scale * dct_matrix(adapter.fan_out).T @ spectrum @ dct_matrix(adapter.fan_in)


def perturbed_llama(**options):
    model = peftlab.adapt(tiny_llama(), "loca", **{"n_frequency": 64, **options})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, adapter in adapters_of(model):
            adapter.spectrum.copy_(torch.randn(adapter.spectrum.shape, generator=gen))
    return model


def test_dct_rows_are_the_orthonormal_dct_ii():
    n = 12
    j, k = torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64)[:, None]
    expected = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2 / n)
    expected[0] /= math.sqrt(2)
    assert torch.allclose(dct_matrix(n), expected, atol=1e-12)
    assert torch.allclose(dct_matrix(48) @ dct_matrix(48).T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    freqs = torch.tensor([0, 1, 5000, 11007])  # exact angle reduction keeps float32 accurate at 11008
    fp32, fp64 = dct_rows(freqs, 11008, torch.float32), dct_rows(freqs, 11008, torch.float64)
    assert (fp32.double() - fp64).abs().max() < 1e-6


@pytest.mark.parametrize("forward", ["factored", "dense"])
def test_forward_equals_the_dense_idct_of_the_spectrum(forward):
    model = perturbed_llama(forward=forward)
    x = torch.randn(2, 5, 48)
    for layer, adapter in adapters_of(model):
        inputs = x[..., : adapter.fan_in]
        delta = dense_delta(adapter)
        assert torch.allclose(adapter.delta_weight(layer).double(), delta, atol=1e-5)
        with torch.no_grad():
            expected = torch.nn.functional.linear(inputs, layer.weight + delta.float(), layer.bias)
            assert torch.allclose(layer(inputs), expected, atol=1e-5)


def test_auto_forward_picks_the_cheaper_computation():
    model = peftlab.adapt(tiny_llama(), "loca", n_frequency=64)
    adapter = adapters_of(model)[0][1]  # q: 32 x 32, n = 64 > in·out / (in + out)
    assert not adapter.use_dense(1) and adapter.use_dense(1000)


@pytest.mark.parametrize("tokens, mode, folds", [((4, 8), "auto", True), ((2, 4), "auto", False),
                                                 ((4, 8), "factored", False), ((4, 8), "dense", False)])
def test_auto_folds_into_the_layers_product_where_it_pays(tokens, mode, folds):
    """Alone on a plain layer, without dropout and from 2·in·out / (in + out) tokens (19.2 here), "auto" runs
    (W + ΔW) x + b as one product; output and gradients (input, coefficients) are the dense iDCT's."""
    gen = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, dtype=torch.float64))
    peftlab.adapt(model, "loca", n_frequency=12, scale=1.5, forward=mode, targets=["0"]).double().train()
    layer, adapter = adapters_of(model)[0]
    with torch.no_grad():
        adapter.spectrum.copy_(torch.randn(12, generator=gen, dtype=torch.float64))
    spectrum = adapter.spectrum.detach().clone().requires_grad_()
    rows, cols = adapter.indices()
    sparse = torch.zeros(24, 16, dtype=torch.float64).index_put((rows, cols), spectrum, accumulate=True)
    delta = 1.5 * dct_matrix(24).T @ sparse @ dct_matrix(16)
    x = torch.randn(*tokens, 16, generator=gen, dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = torch.nn.functional.linear(x_ref, layer.weight + delta, layer.bias)
    out = model(x_got)
    assert made_by_fold(out) == folds
    assert_same_function(out, expected, ((x_got, x_ref), (adapter.spectrum, spectrum)), gen)


@pytest.mark.parametrize("tokens", [(2, 7), (4, 16)])  # 14: factored; 64 >= 2·32·32 / 64: folded
def test_location_gradient_is_the_official_finite_difference(tokens):
    model = perturbed_llama()
    layer, adapter = adapters_of(model)[3]  # o_proj
    adapter.train()
    adapter.on_step(TrainingStep(step=10, total_steps=300, lr=1e-3, peak_lr=1e-3))  # a location step
    assert adapter.learning_locations
    x = torch.randn(*tokens, adapter.fan_in)
    target = torch.randn(*tokens, adapter.fan_out)
    assert made_by_fold(layer(x)) == (tokens == (4, 16))
    adapter.location_grad.zero_()
    (layer(x) - target).pow(2).sum().backward()
    # the official backward: K = DCT2(∂L/∂iDCT(S)); grad = clamp(½ a (K[+1] − K[−1]), ±1)·(dim − 1)
    rows, cols = adapter.indices()
    unscaled = (dense_delta(adapter) / adapter.scale).float().requires_grad_()
    out = torch.nn.functional.linear(x, layer.weight + adapter.scale * unscaled, layer.bias)
    (out - target).pow(2).sum().backward()
    k = (dct_matrix(adapter.fan_out) @ unscaled.grad.double() @ dct_matrix(adapter.fan_in).T).float()
    m, n, a = adapter.fan_out, adapter.fan_in, adapter.spectrum.detach()
    row = (0.5 * a * (k[(rows + 1).clamp(max=m - 1), cols] - k[(rows - 1).clamp(min=0), cols])).clamp(-1, 1)
    col = (0.5 * a * (k[rows, (cols + 1).clamp(max=n - 1)] - k[rows, (cols - 1).clamp(min=0)])).clamp(-1, 1)
    inside = ((adapter.locations >= 0) & (adapter.locations <= 0.999)).float()  # clamp's gradient
    expected = torch.stack([row * (m - 1), col * (n - 1)]) * inside
    assert torch.allclose(adapter.location_grad, expected, rtol=1e-4, atol=1e-4)
    assert adapter.location_grad.abs().sum() > 0


def test_schedule_alternates_then_freezes_the_locations():
    adapter = adapters_of(peftlab.adapt(tiny_llama(), "loca", n_frequency=8))[0][1]

    def phase(t, total=300):
        return adapter.phase_at(TrainingStep(step=t, total_steps=total, lr=1.0, peak_lr=1.0))

    # B_s = 10% of 300 = 30: one cycle of 10 coefficient steps then 20 location steps
    assert [phase(t) for t in (0, 9, 10, 29, 30, 250)] == (
        ["coefficients"] * 2 + ["locations"] * 2 + ["coefficients"] * 2)
    adapter.location_steps = 65
    assert [phase(t) for t in (30, 39, 40, 59, 60, 64, 65)] == (
        ["coefficients"] * 2 + ["locations"] * 2 + ["coefficients"] * 3)


def test_training_hooks_move_locations_and_freeze_coefficients():
    model = perturbed_llama()
    model.train()
    inputs = make_inputs("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    pairs = adapters_of(model)
    before_loc = [a.locations.clone() for _, a in pairs]
    before_coef = [a.spectrum.detach().clone() for _, a in pairs]
    step = TrainingStep(step=12, total_steps=300, lr=5e-4, peak_lr=1e-3)  # location phase, lr at half its peak
    peftlab.core.api.on_step(model, step)
    optimizer.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [a.location_grad.clone() for _, a in pairs]
    peftlab.core.api.before_optimizer_step(model, step)
    optimizer.step()
    for (_, adapter), loc, coef, grad in zip(pairs, before_loc, before_coef, grads):
        assert adapter.spectrum.grad is None and torch.equal(adapter.spectrum.detach(), coef)
        # the first Adam step moves each coordinate by lr·g/(|g| + ε): 1e-4 · 0.5 times sign(g)
        expected = loc - 0.5e-4 * grad / (grad.abs() + 1e-8)
        assert torch.allclose(adapter.locations, expected, atol=1e-9)
        assert (adapter.locations != loc).any()
    # a coefficient step: locations stay, coefficients move
    step = TrainingStep(step=31, total_steps=300, lr=1e-3, peak_lr=1e-3)
    peftlab.core.api.on_step(model, step)
    frozen = [a.locations.clone() for _, a in pairs]
    optimizer.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    peftlab.core.api.before_optimizer_step(model, step)
    optimizer.step()
    for (_, adapter), loc, coef in zip(pairs, frozen, before_coef):
        assert torch.equal(adapter.locations, loc) and not torch.equal(adapter.spectrum.detach(), coef)


def test_moved_locations_save_and_load(tmp_path):
    model = perturbed_llama()
    with torch.no_grad():
        for _, adapter in adapters_of(model):
            adapter.locations.add_(0.01)
    peftlab.save(model, tmp_path)
    fresh = peftlab.load(tiny_llama(), tmp_path)
    for (_, a), (_, b) in zip(adapters_of(model), adapters_of(fresh)):
        assert torch.equal(a.locations, b.locations) and torch.equal(a.indices()[0], b.indices()[0])


def test_counts_and_errors():
    assert peftlab.LoCA().trainable_count(4096, 4096) == 1000
    assert 32 * 2 * peftlab.LoCA().trainable_count(4096, 4096) == 64_000  # Llama-2-7B, q and v
    with pytest.raises(peftlab.ConfigError, match="n_frequency"):
        peftlab.adapt(tiny_llama(), "loca", n_frequency=600)  # k/v are 32 -> 16: 512 entries
    with pytest.raises(peftlab.ConfigError, match="forward"):
        peftlab.LoCA(forward="fast")
