"""CorDA: covariance-oriented SVD init, ipm trains the first r, kpm the last r (spec: shared/methods/corda.md)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.corda import CovarianceStatistic, corda_factors, damp_covariance

from ..conftest import assert_same_function, made_by_fold, make_inputs, output_of, tiny_gpt2, tiny_llama

CASES = {"corda": {"r": 4}}
VARIANTS = [("corda", {"r": 4, "mode": "kpm", "alpha": 8.0})]
TRAIN_LR = {"corda": 1e-2}


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def synthetic(out=24, fan_in=16, tokens=200):
    weight = torch.randn(out, fan_in, generator=gen(0))
    x = torch.randn(tokens, fan_in, generator=gen(1)) * torch.linspace(0.2, 3.0, fan_in)
    stat = CovarianceStatistic(fan_in)
    stat.update(x.reshape(4, tokens // 4, fan_in))
    return weight, stat.covariance()


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_factors_reproduce_the_chosen_part_of_the_oriented_svd(mode, alpha):
    weight, cov = synthetic()
    r = 5
    scale = 1.0 if alpha is None else alpha / r
    a0, b0 = corda_factors(weight, cov, r, mode, scale)
    assert a0.shape == (r, 16) and b0.shape == (24, r)
    damped, _, _ = damp_covariance(cov)
    u, sigma, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    idx = slice(0, r) if mode == "ipm" else slice(16 - r, 16)
    part = scale * b0 @ a0
    truncation = u[:, idx] @ torch.diag(sigma[idx]) @ vh[idx]
    assert torch.allclose(part @ damped, truncation, atol=1e-4 * sigma[0])  # check 2
    residual = weight - part
    assert (residual + part - weight).norm() / weight.norm() < 1e-5  # check 1
    rest = torch.linalg.svdvals(residual @ damped)[: 16 - r]  # check 3
    expected = sigma[r:] if mode == "ipm" else sigma[: 16 - r]
    assert torch.allclose(rest, expected, rtol=1e-3, atol=1e-4 * sigma[0])
    top = torch.linalg.matrix_norm(part @ damped, ord=2)
    assert torch.allclose(top, sigma[0] if mode == "ipm" else sigma[16 - r], rtol=1e-4)


def test_covariance_uses_the_signed_maximum_per_sample_and_drops_padding():
    x = torch.randn(3, 5, 4, generator=gen(2))
    x[1, 2, 3] = -50.0  # |min| > max: the signed max still scales this sample
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, -1] = False
    x[0, :2] = 1e4  # padding values must not reach the maximum nor the product
    stat = CovarianceStatistic(4)
    stat.update(x, mask)
    expected = torch.zeros(4, 4)
    for b in range(3):
        sample = x[b][mask[b]]
        sample = sample / sample.max().abs()
        expected += sample.T @ sample
    assert stat.samples == 3
    assert torch.allclose(stat.covariance(), expected / 3, rtol=1e-5)
    stat.update(x[2, :3])  # an unbatched (tokens, in) input is one sample
    assert stat.samples == 4


def test_damping_stops_at_the_first_factor_meeting_the_tolerance():
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen(3)))
    cov = (q * torch.logspace(-9, 3, 48)) @ q.T
    eye, mean = torch.eye(48), cov.diagonal().mean()

    def error(damp):
        damped = cov + damp * mean * eye
        return torch.dist(damped @ torch.linalg.inv(damped), eye).item()

    errors = [error(0.01 * 2**k) for k in range(12)]
    tolerance = errors[0]  # strict: 0.01 itself fails, a later doubling must be taken
    first = next(k for k, e in enumerate(errors) if e < tolerance)
    damped, inverse, damp = damp_covariance(cov, tolerance=tolerance)
    assert damp == pytest.approx(0.01 * 2**first) and first >= 1
    assert torch.allclose(damped, cov + damp * mean * eye)
    _, _, damp = damp_covariance(synthetic()[1])
    assert damp == 0.01  # a well-conditioned covariance keeps the first factor


def test_adapted_model_starts_at_the_base_with_only_a_and_b_trainable():
    model, inputs = tiny_llama(), make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    batches = [make_inputs("llama", seed=s) for s in range(4)]
    peftlab.adapt(model, "corda", r=4, alpha=2.0, mode="kpm", calibration=batches)
    with torch.no_grad():  # B A - B0 A0 is one stacked product: zero up to its rounding
        torch.testing.assert_close(output_of(model, inputs), base, rtol=1e-5, atol=1e-6)
    pairs = adapters_of(model)
    for layer, adapter in pairs:
        assert [n for n, _ in adapter.named_parameters()] == ["lora_A", "lora_B"]
        assert not adapter.base_A.requires_grad and not adapter.base_B.requires_grad
        assert {"base_A", "base_B"} <= set(adapter.state_dict())  # calibration-derived: saved
        assert (adapter.residual(layer) + adapter.scale * adapter.lora_B @ adapter.lora_A
                - weight_matrix(layer)).norm() < 1e-5 * weight_matrix(layer).norm()
    assert peftlab.trainable_parameter_count(model) == sum(4 * (m.in_features + m.out_features) for m, _ in pairs)
    assert peftlab.CorDA().trainable_count(4096, 4096) == 1_048_576  # r = 128


@pytest.mark.parametrize("tokens, dropout, folds", [((4, 16), 0.0, True), ((1, 3), 0.0, False), ((4, 16), 0.3, False)])
def test_forward_and_gradients_match_the_formula(tokens, dropout, folds):
    """float64 against y = W0 x + b + s·B A dropout(x) - s·B0 A0 x, with B A moved off B0 A0; folded into the
    layer's product for enough tokens without dropout, one addmm otherwise."""
    g = gen(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, dtype=torch.float64))
    calibration = [torch.randn(4, 8, 16, generator=gen(s), dtype=torch.float64) for s in range(2)]
    peftlab.adapt(model, "corda", r=3, alpha=6.0, dropout=dropout, targets=["0"], calibration=calibration).double()
    layer, adapter = adapters_of(model)[0]
    with torch.no_grad():
        adapter.lora_A.add_(0.3 * torch.randn(adapter.lora_A.shape, generator=g, dtype=torch.float64))
        adapter.lora_B.add_(0.3 * torch.randn(adapter.lora_B.shape, generator=g, dtype=torch.float64))
    a, b = (p.detach().clone().requires_grad_() for p in (adapter.lora_A, adapter.lora_B))
    x = torch.randn(*tokens, 16, generator=g, dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    h = torch.nn.functional.dropout(x_ref, dropout)
    s = adapter.scale
    expected = (torch.nn.functional.linear(x_ref, layer.weight, layer.bias) + s * h @ a.T @ b.T
                - s * x_ref @ adapter.base_A.T @ adapter.base_B.T)
    torch.manual_seed(5)
    out = model(x_got)
    assert made_by_fold(out) == folds
    assert_same_function(out, expected, ((x_got, x_ref), (adapter.lora_A, a), (adapter.lora_B, b)), g)


def test_calibration_through_adapt_uses_the_mask_and_matches_a_manual_covariance():
    model = tiny_llama()
    batches = [make_inputs("llama", seed=s) for s in range(3)]
    batches[0]["attention_mask"][0, :4] = 0  # left padding in the first row
    layer = model.model.layers[1].mlp.down_proj
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    expected = torch.zeros(48, 48)
    for x, batch in zip(seen, batches):
        for row, keep in zip(x, batch["attention_mask"].bool()):
            sample = row[keep] / row[keep].max().abs()
            expected += sample.T @ sample
    expected /= 6
    a0, b0 = corda_factors(weight_matrix(layer).detach().float(), expected, 4, "ipm", 1.0)
    peftlab.adapt(model, "corda", r=4, targets=["layers.1.mlp.down_proj"], calibration=batches)
    adapter = layer.peftlab["default"]
    assert torch.allclose(adapter.lora_B @ adapter.lora_A, b0 @ a0, atol=1e-5)


def test_save_load_keeps_the_calibrated_factors(tmp_path):
    model, inputs = tiny_gpt2(), make_inputs("gpt2")
    peftlab.adapt(model, "corda", r=4, calibration=[make_inputs("gpt2", seed=s) for s in range(3)])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.2)
        adapted = output_of(model, inputs)
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_gpt2(), tmp_path / "a")  # no calibration on load
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), adapted, atol=1e-5)
    peftlab.export(model, tmp_path / "peft")  # against the original W0: rank 2r, [B, -B0], [A; A0]
    as_lora = peftlab.load(tiny_gpt2(), tmp_path / "peft")
    assert peftlab.adapters(as_lora)["default"].r == 8
    with torch.no_grad():
        assert torch.allclose(output_of(as_lora, inputs), adapted, atol=1e-5)


def test_config_and_calibration_errors():
    for bad in ({"r": 0}, {"mode": "both"}, {"alpha": -1.0}, {"dropout": 1.5}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.CorDA(**bad)
    with pytest.raises(peftlab.ConfigError, match="calibration"):
        peftlab.adapt(tiny_llama(), "corda", r=4)
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(tiny_llama(), "corda", r=20, calibration=[make_inputs("llama")])
    with pytest.raises(peftlab.ConfigError, match="empty"):
        peftlab.adapt(tiny_llama(), "corda", r=4, calibration=[])
