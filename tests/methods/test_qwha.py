"""QWHA: Walsh–Hadamard adapter with AdaAlloc + value-refinement init (arXiv 2509.17428; see qwha.py)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import peftlab
from peftlab.core.inject import folds_into, hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.qwha import allocate, fwht, hadamard_columns, next_power_of_two

from ..conftest import (
    assert_close_fp64,
    backward_through,
    dense_reference,
    make_inputs,
    output_of,
    stack_under_lora,
    tiny_gpt2,
    tiny_llama,
)


class NoisyReference:
    """A stand-in for "the full-precision weights the base was quantized from": W + small noise."""

    def __call__(self, site):
        gen = torch.Generator().manual_seed(zlib.crc32(site.path.encode()))
        weight = site.weight()
        return weight + 0.05 * weight.abs().mean() * torch.randn(weight.shape, generator=gen)

    def __repr__(self) -> str:
        return "noisy"


CASES = {"qwha": {"r": 2, "init": "random"}}
VARIANTS = [
    ("qwha", {"r": 2, "init": "adaalloc", "reference": NoisyReference()}),
    ("qwha", {"r": 2, "init": "random", "forward": "dense", "scaling": 100.0}),
]
TRAIN_LR = {"qwha": 1e-3}  # scaling 4000: one unit of a coefficient moves a whole row of ΔW


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def reference_delta(adapter) -> torch.Tensor:
    """The code's get_delta_weight: scaling/√out · F H / N, with F dense (out x N), first ``in`` columns."""
    spectrum = torch.zeros(adapter.fan_out * adapter.size, dtype=torch.float64)
    spectrum[adapter.positions.long()] = adapter.spectrum.detach().double()
    spectrum = spectrum.view(adapter.fan_out, adapter.size)
    return (adapter.coef * spectrum @ sylvester(adapter.size))[:, : adapter.fan_in]


def quantized_llama():
    """Tiny Llama with round-to-nearest 3-bit weights (per row) and the original weights as reference."""
    model, reference = tiny_llama(), {}
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path != "lm_head":
                w = module.weight
                step = w.abs().amax(1, keepdim=True) / 3
                reference[path] = w.clone()
                module.weight.copy_((w / step).round() * step)
    return model, reference


def calibration():
    return [make_inputs("llama", seed=s) for s in range(4)]


def test_fast_walsh_hadamard_is_the_sylvester_matrix():
    for n in (1, 2, 16, 64):
        x = torch.randn(3, n, dtype=torch.float64)
        assert torch.allclose(fwht(x), x @ sylvester(n), atol=1e-12)
        assert torch.equal(hadamard_columns(n, torch.arange(n)), sylvester(n))
    assert next_power_of_two(48) == 64 and next_power_of_two(64) == 64
    with pytest.raises(ValueError):
        fwht(torch.zeros(3, 48))


@pytest.mark.parametrize("forward", ["activations", "dense"])
def test_fast_path_equals_the_dense_inverse_wht(forward):
    model = peftlab.adapt(tiny_llama(), "qwha", r=2, init="random", forward=forward)
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for layer, adapter in adapters_of(model):
        with torch.no_grad():
            adapter.spectrum.copy_(torch.randn(adapter.spectrum.shape, generator=gen))
        delta = reference_delta(adapter)
        assert torch.allclose(adapter.delta_weight(layer).double(), delta, atol=1e-4)
        x = torch.randn(2, 3, adapter.fan_in, generator=gen)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, layer.weight + delta.float(), layer.bias)
            assert torch.allclose(layer(x), expected, atol=1e-4)
        sizes.add((adapter.fan_in, adapter.size))
    assert (48, 64) in sizes  # down_proj: zero-padded to the next power of two


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d-bias"])
@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stacked"])
@pytest.mark.parametrize("forward", ["auto", "activations", "dense"])
def test_training_paths_are_the_dense_formula_with_gradients(forward, stacked, make):
    """Output and the gradients of x and of the spectrum equal those of (W + ΔW) x + b, ΔW = c/N · F H_N[:, :in]
    written out in fp64, on every path: ΔW folded into W's product (alone on a plain layer), added to base(x)
    (under another adapter), or the tokens transformed."""
    model = peftlab.adapt(make(), "qwha", r=2, init="random", forward=forward)
    if stacked:
        stack_under_lora(model)
    gen = torch.Generator().manual_seed(0)
    for layer, adapter in adapters_of(model):
        with torch.no_grad():
            adapter.spectrum.copy_(torch.randn(adapter.spectrum.shape, generator=gen))
        assert folds_into(layer) is not stacked
        x, probe, y = backward_through(layer, adapter.fan_in, adapter.fan_out, gen)

        spectrum = adapter.spectrum.detach().double().requires_grad_()
        dense = torch.zeros(adapter.fan_out * adapter.size, dtype=torch.float64).index_put(
            (adapter.positions.long(),), spectrum).view(adapter.fan_out, adapter.size)
        delta = adapter.coef * (dense @ sylvester(adapter.size))[:, : adapter.fan_in]
        expected, x64 = dense_reference(layer, x, probe, delta)
        assert_close_fp64(y, expected)
        assert_close_fp64(x.grad, x64.grad)
        assert_close_fp64(adapter.spectrum.grad, spectrum.grad)


def test_random_init_is_the_codes_seeded_permutation():
    model = peftlab.adapt(tiny_llama(), "qwha", r=2, init="random")
    layer, adapter = adapters_of(model)[0]  # q_proj 32 x 32: no padding
    n = 2 * (32 + 32)
    chosen = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(777))[:n]
    assert torch.equal(adapter.positions.long(), chosen)
    assert torch.count_nonzero(adapter.spectrum) == 0
    assert "positions" not in adapter.state_dict()  # regenerated from the seed


def calibrated_error(delta, target, gram):
    e = (delta - target).double()
    return torch.einsum("oi,ij,oj->", e, gram, e).sqrt()


def test_adaalloc_fits_the_quantization_error():
    model, reference = quantized_llama()
    full = tiny_llama()
    batches = calibration()
    grams = {p: 0.0 for p in reference}

    def record(path):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[path] = grams[path] + x.T @ x
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(record(p)) for p in reference]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for handle in handles:
        handle.remove()
    inputs = make_inputs("llama", seed=9)
    with torch.no_grad():
        quant_out, full_out = output_of(model, inputs), output_of(full, inputs)
    peftlab.adapt(model, "qwha", r=2, reference=reference, calibration=batches)
    for path, module, slot in hosts(model):
        adapter = slot["default"]
        target = reference[path] - weight_matrix(module).detach()
        delta = adapter.delta_weight(module).detach()
        assert calibrated_error(delta, target, grams[path]) < 0.8 * calibrated_error(0 * delta, target, grams[path])
        # value refinement: the least-squares values beat the plain transform coefficients at the same positions
        plain = torch.zeros(adapter.fan_out * adapter.size, dtype=torch.float64)
        coeffs = fwht(torch.nn.functional.pad(target.double(), (0, adapter.size - adapter.fan_in))) / adapter.size
        plain[adapter.positions.long()] = coeffs.flatten()[adapter.positions.long()]
        plain_delta = (plain.view(adapter.fan_out, adapter.size) @ sylvester(adapter.size))[:, : adapter.fan_in]
        assert calibrated_error(delta, target, grams[path]) <= calibrated_error(plain_delta, target, grams[path])
    with torch.no_grad():
        adapted_out = output_of(model, inputs)
    assert (adapted_out - full_out).norm() < 0.6 * (quant_out - full_out).norm()


def test_adaalloc_budgets_follow_the_error_per_channel():
    model, reference = quantized_llama()
    peftlab.adapt(model, "qwha", r=2, reference=reference, calibration=calibration())
    layer, adapter = adapters_of(model)[0]
    target = reference["model.layers.0.self_attn.q_proj"] - layer.weight.detach()
    counts = torch.bincount(adapter.positions.long() // adapter.size, minlength=adapter.fan_out)
    assert int(counts.sum()) == adapter.spectrum.numel() and int(counts.max()) <= adapter.fan_in
    norms = target.double().norm(dim=1)  # ‖H_N pad(t)‖ = √N ‖t‖: budgets ∝ the channel's error norm
    assert torch.equal(counts, allocate(norms, adapter.spectrum.numel(), adapter.fan_in))
    assert counts[norms.argmax()] > counts[norms.argmin()]


def test_allocate_sums_to_the_budget_under_the_cap():
    weights = torch.tensor([10.0, 1.0, 1.0, 0.0])
    counts = allocate(weights, 20, cap=8)
    assert counts.tolist()[0] == 8 and int(counts.sum()) == 20 and int(counts.max()) <= 8
    assert allocate(torch.ones(5), 7, cap=4).tolist() == [2, 2, 1, 1, 1]


def test_errors_and_reference_is_not_saved(tmp_path):
    with pytest.raises(peftlab.ConfigError, match="reference"):
        peftlab.adapt(tiny_llama(), "qwha", r=2, calibration=calibration())
    with pytest.raises(peftlab.ConfigError, match="calibration"):
        peftlab.adapt(tiny_llama(), "qwha", r=2, reference=NoisyReference())
    model = tiny_llama()
    same = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(peftlab.ConfigError, match="zero"):  # full-precision base, reference = base
        peftlab.adapt(model, "qwha", r=2, reference=same, calibration=calibration())
    with pytest.raises(peftlab.ConfigError, match="in·out"):
        peftlab.adapt(tiny_llama(), "qwha", r=16, init="random")
    model = peftlab.adapt(tiny_llama(), "qwha", r=2, reference=NoisyReference(), calibration=calibration())
    assert "reference" not in peftlab.adapters(model)["default"].options()
    assert "positions" in adapters_of(model)[0][1].state_dict()  # data-dependent: saved
    peftlab.save(model, tmp_path)
    fresh = peftlab.load(tiny_llama(), tmp_path)
    for (_, a), (_, b) in zip(adapters_of(model), adapters_of(fresh)):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.spectrum, b.spectrum)


def test_counts_match_lora_at_the_same_rank():
    config = peftlab.QWHA()
    assert config.trainable_count(4096, 4096) == 524_288 == peftlab.LoRA(r=64).trainable_count(4096, 4096)
    per_layer = 4 * config.trainable_count(4096, 4096) + 2 * config.trainable_count(4096, 11008) \
        + config.trainable_count(11008, 4096)
    assert per_layer * 32 == 159_907_840
    assert math.isclose(config.scaling, 4000.0) and config.r == 64
