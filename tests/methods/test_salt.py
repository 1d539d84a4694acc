"""salt: scale/shift of the top singular values, X Y inside the tail block, ReLU over the whole Σ'."""

from __future__ import annotations

import math

import pytest
import torch

import peftlab
from peftlab.core.api import attached_adapters
from peftlab.methods.salt import split

from ..conftest import adapter_of, one_layer, rel_err, tiny_llama

CASES = {"salt": {"ratio": 0.1, "r_lora": 4}}
VARIANTS = [
    ("salt", {"ratio": 0.25, "r_lora": 4, "path": "subspace", "seed": None}),
    ("salt", {"ratio": 0.1, "r_lora": 4, "reg_multiplier": 1e-2}),
    ("salt", {"ratio": 0.1, "r_lora": 4, "forward": "delta"}),
]





def reference_weight(adapter) -> torch.Tensor:
    """U ReLU(Σ') Vᵀ, Σ' built densely as the official ``get_modified_singular_values`` does."""
    r = adapter.r
    sigma = adapter.sigma
    new_s = torch.diag(sigma)
    new_s[:r, :r] = torch.diag(adapter.scale * sigma[:r] + adapter.shift)
    new_s[r:, r:] = new_s[r:, r:] + adapter.X @ adapter.Y
    return adapter.u @ torch.relu(new_s) @ adapter.vh


@pytest.mark.parametrize("forward", ["direct", "delta"])
@pytest.mark.parametrize("path", ["auto", "dense", "folded", "subspace"])
def test_init_equals_the_base(path, forward):
    model = one_layer()
    x = torch.randn(5, 24)
    with torch.no_grad():
        base = model(x)
        peftlab.adapt(model, "salt", path=path, forward=forward)
        assert rel_err(model(x), base) <= 1e-5
    adapter = adapter_of(model)
    assert adapter.stackable == (forward == "delta")
    if forward == "delta":  # exactly the base: the spectral change is zero, not just small
        assert torch.count_nonzero(adapter.delta_weight(model[0])) == 0
    assert torch.equal(adapter.scale, torch.ones(2)) and torch.count_nonzero(adapter.shift) == 0


@pytest.mark.parametrize("forward", ["direct", "delta"])
@pytest.mark.parametrize("path", ["dense", "folded", "subspace"])
@pytest.mark.parametrize("fan_in, fan_out", [(24, 40), (40, 24), (24, 24)])
def test_every_path_is_the_dense_formula_with_its_gradients(fan_in, fan_out, path, forward):
    """Outputs and gradients of each product order equal (W0 + ΔW) x + b with ΔW = U ReLU(Σ') Vᵀ − W0 built
    densely as the reference does (direct), or U (ReLU(Σ') − diag σ) Vᵀ (delta)."""
    model = one_layer(fan_in, fan_out)
    adapter = adapter_of(peftlab.adapt(model, "salt", ratio=0.25, r_lora=3, path=path, forward=forward))
    with torch.no_grad():
        adapter.Y.normal_(std=0.3)  # negative entries in X Y, so the ReLU bites off the diagonal
        adapter.scale.uniform_(-1.0, 2.0)
        adapter.shift.normal_(std=0.1)
        adapter.shift[0] = -2 * adapter.sigma[0]  # a top value clipped to 0
    layer = model[0]
    x = torch.randn(2, 5, fan_in, requires_grad=True)
    weights = torch.randn(2, 5, fan_out)
    params = [adapter.scale, adapter.shift, adapter.X, adapter.Y, x]

    out = model(x)
    fast = torch.autograd.grad((out * weights).sum(), params)
    w0 = layer.weight.detach()
    spectral = reference_weight(adapter)
    if forward == "delta":
        spectral = w0 + spectral - (adapter.u * adapter.sigma) @ adapter.vh
    expected = x @ spectral.T + layer.bias
    slow = torch.autograd.grad((expected * weights).sum(), params)
    assert rel_err(out, expected) <= 1e-6
    for got, want in zip(fast, slow):
        assert rel_err(got, want) <= 1e-5


def test_auto_folds_calls_longer_than_k_and_uses_the_cache_in_eval():
    model = peftlab.adapt(one_layer(), "salt")  # k = 24
    adapter = adapter_of(model)
    model.train()
    assert adapter._path(25) == "folded" and adapter._path(24) == "subspace"
    model.eval()
    with torch.no_grad():
        assert adapter._path(25) == "dense"
    assert adapter._path(25) == "folded"  # gradients tracked: the product is rebuilt, folding is cheaper


def test_reference_init_of_x():
    adapter = adapter_of(peftlab.adapt(one_layer(), "salt", r_lora=8))
    bound = math.sqrt(6 / 8)  # kaiming_uniform(mode=fan_in, relu) on (t, r_lora): the code's a=√20 is ignored
    assert adapter.X.abs().max() <= bound and adapter.X.abs().max() > 0.8 * bound
    assert torch.count_nonzero(adapter.Y) == 0
    state = torch.random.get_rng_state()
    torch.manual_seed(42)  # what every reference layer does before drawing X
    expected = torch.nn.init.kaiming_uniform_(torch.empty(adapter.X.shape), a=math.sqrt(20), nonlinearity="relu")
    torch.random.set_rng_state(state)
    assert torch.equal(adapter.X.detach(), expected)
    before = torch.random.get_rng_state()
    peftlab.adapt(one_layer(), "salt")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is not reseeded


def test_doubling_the_top_values():
    model = one_layer()
    w0 = model[0].weight.detach().clone()
    adapter = adapter_of(peftlab.adapt(model, "salt", ratio=0.25))
    r = adapter.r
    assert r == 6
    with torch.no_grad():
        adapter.scale.fill_(2.0)
    top = (adapter.u[:, :r] * adapter.sigma[:r]) @ adapter.vh[:r]
    assert torch.allclose(reference_weight(adapter) - w0, top, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(model[0]), top, atol=1e-5)


def test_negative_shift_clips_the_top_block():
    model = one_layer()
    adapter = adapter_of(peftlab.adapt(model, "salt", ratio=0.25))
    with torch.no_grad():
        adapter.shift.copy_(-2 * adapter.sigma[: adapter.r])
    merged = model[0].weight.detach() + adapter.delta_weight(model[0])
    assert torch.linalg.matrix_rank(merged, atol=1e-4) == 24 - adapter.r


def test_relu_acts_on_every_entry_of_the_tail_block():
    model = one_layer()
    x = torch.randn(7, 24)
    adapter = adapter_of(peftlab.adapt(model, "salt", ratio=0.25, r_lora=3))
    with torch.no_grad():
        adapter.Y.normal_(std=0.3)
        adapter.scale.uniform_(-1.0, 2.0)
        adapter.shift.normal_(std=0.1)
    product = adapter.X @ adapter.Y
    assert (product < 0).any()  # negative off-diagonal entries exist and must be clipped
    w0 = model[0].weight.detach()
    reference = reference_weight(adapter)
    assert torch.allclose(w0 + adapter.delta_weight(model[0]), reference, atol=1e-5)
    expected = x @ reference.T + model[0].bias
    with torch.no_grad():
        for path in ("dense", "folded", "subspace"):
            adapter.path = path
            assert rel_err(model(x), expected) <= 1e-5, path
    assert torch.allclose(adapter.singular_matrix(), torch.relu(adapter.u.T @ reference @ adapter.vh.T), atol=1e-5)


def test_trainable_count():
    model = peftlab.adapt(one_layer(), "salt", ratio=0.1, r_lora=4)
    trainable = {n.rsplit(".", 1)[-1]: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"scale": 2, "shift": 2, "X": 22 * 4, "Y": 4 * 22}  # r = ⌊2.4⌋, t = 22
    assert peftlab.method_class("salt")().trainable_count(4096, 4096) == 1_888_562
    assert split(4096, 11008, 0.1) == (409, 3687) and split(10, 10, 0.01) == (1, 9)


def test_regulariser_and_first_gradients():
    model = peftlab.adapt(tiny_llama(), "salt", ratio=0.1, r_lora=4, reg_multiplier=1.0)
    adapters = attached_adapters(model, "default")
    assert peftlab.regularization(model).item() == 0
    ids = torch.randint(3, 128, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for a in adapters.values():
        assert torch.count_nonzero(a.X.grad) == 0  # Y = 0
    assert any(a.Y.grad.abs().sum() > 0 for a in adapters.values())
    with torch.no_grad():
        for a in adapters.values():
            a.shift.normal_()
    expected = sum(a.shift.norm() for a in adapters.values())
    assert torch.allclose(peftlab.regularization(model), expected, rtol=1e-5)
    with torch.no_grad():
        for a in adapters.values():
            a.Y.normal_()
            a.scale.normal_()
    by_hand = sum(torch.linalg.norm((a.scale - 1) * a.sigma[: a.r] + a.shift) + torch.linalg.norm(a.X @ a.Y)
                  for a in adapters.values())
    assert torch.allclose(peftlab.regularization(model), by_hand, rtol=1e-4)
    assert peftlab.adapters(model)["default"].replace(reg_multiplier=0.0).regularization(adapters) is None


def test_eval_caches_the_rebuilt_weight_until_a_parameter_changes():
    model = peftlab.adapt(one_layer().eval(), "salt")
    adapter = adapter_of(model)
    x = torch.randn(2, 24)
    with torch.no_grad():
        model(x)
        cached = adapter._cache[1]
        model(x)
        assert adapter._cache[1] is cached
        adapter.shift.add_(0.5)
        changed = model(x)
        assert adapter._cache[1] is not cached
        assert torch.allclose(changed, x @ (model[0].weight + adapter.delta_weight(model[0])).T + model[0].bias,
                              atol=1e-5)
    model.train()
    assert adapter._cache is None


def test_v1_init_is_not_identity():
    model = one_layer()
    x = torch.randn(3, 24)
    with torch.no_grad():
        base = model(x)
        adapter = adapter_of(peftlab.adapt(model, "salt", init="v1"))
        assert not torch.allclose(model(x), base, atol=1e-7)
    assert adapter.X.std() < 0.02 and adapter.Y.std() > 0.005
    assert not peftlab.method_class("salt")(init="v1").identity_at_init


@pytest.mark.parametrize("options", [{"ratio": 0.0}, {"ratio": 1.1}, {"r_lora": 0}, {"reg_multiplier": -1.0},
                                     {"init": "v2"}, {"path": "factored"}, {"seed": 1.5}, {"forward": "factored"}])
def test_bad_options_raise(options):
    with pytest.raises(peftlab.ConfigError):
        peftlab.method_class("salt")(**options)
