"""svft (CLIP-SVD): only the singular values of each adapted weight train."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.svft import kept_rank

from ..conftest import adapter_of, one_layer, rel_err, tiny_gpt2, tiny_llama

CASES = {"svft": {}}
VARIANTS = [
    ("svft", {"forward": "delta"}),
    ("svft", {"rank_ratio": 0.5, "rank_multiple": 4}),  # truncated, as the official code with --rank 0.5
]





@pytest.mark.parametrize("forward", ["delta", "factored"])
def test_init_equals_the_base_layer(forward):
    model = one_layer()
    x = torch.randn(5, 24)
    with torch.no_grad():
        base = model(x)
        peftlab.adapt(model, "svft", forward=forward)
        assert rel_err(model(x), base) <= 1e-5
    adapter = adapter_of(model)
    assert torch.equal(adapter.s.detach(), adapter.sigma)
    sigma = torch.linalg.svdvals(model[0].weight.detach())
    assert torch.allclose(adapter.s.detach(), sigma, rtol=1e-5, atol=1e-6)


def test_only_s_trains_and_the_count_is_min_in_out():
    model = peftlab.adapt(one_layer(fan_in=24, fan_out=40), "svft")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["0.peftlab.default.s"] and trainable["0.peftlab.default.s"] == 24
    method = peftlab.method_class("svft")()
    assert method.trainable_count(4096, 4096) == 4096
    assert method.trainable_count(4096, 11008) == method.trainable_count(11008, 4096) == 4096
    # CLIP ViT-B/16, every block linear of both towers (q, k, v, out, c_fc, c_proj; 12 layers each)
    vision = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    text = [(512, 512)] * 4 + [(512, 2048), (2048, 512)]
    assert 12 * sum(method.trainable_count(i, o) for i, o in vision + text) == 92_160


def test_scaling_s_scales_the_weight():
    model = one_layer()
    x = torch.randn(3, 24)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftlab.adapt(model, "svft")
    adapter = adapter_of(model)
    with torch.no_grad():
        adapter.s.mul_(1.7)
        assert torch.allclose(model(x), 1.7 * (x @ weight.T) + bias, atol=1e-5)
    peftlab.merge(model)
    assert torch.allclose(model[0].weight, 1.7 * weight, atol=1e-5)
    assert torch.equal(model[0].bias, bias)


def test_delta_is_diagonal_in_the_singular_basis_and_the_basis_stays_frozen():
    model = peftlab.adapt(tiny_llama(), "svft")
    module = model.model.layers[0].mlp.up_proj  # 32 -> 48
    adapter = module.peftlab["default"]
    frozen = {n: t.clone() for n, t in adapter.named_buffers()}
    weight = module.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for n, t in adapter.named_buffers():
        assert torch.equal(t, frozen[n]), n
    assert torch.equal(module.weight, weight)
    change = adapter.s.detach() - adapter.sigma
    assert change.abs().min() > 0  # every singular value moved
    core = adapter.u.T @ adapter.delta_weight(module) @ adapter.vh.T
    assert torch.allclose(core, torch.diag(change), atol=1e-6)


def test_merge_equals_unmerged_on_gpt2_conv1d():
    model = peftlab.adapt(tiny_gpt2(), "svft", targets=["mlp.c_fc"])
    for _, _, slot in hosts(model):
        with torch.no_grad():
            slot["default"].s.mul_(torch.linspace(0.5, 1.5, slot["default"].s.numel()))
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        peftlab.merge(model)
        merged = model(input_ids=ids).logits
    assert rel_err(merged, adapted) <= 1e-5


def test_truncation_follows_the_official_rounding():
    assert kept_rank(30, 40, 1.0, 1) == 30 and kept_rank(30, 40, 1.0, 4) == 28  # the code drops 2 directions
    assert kept_rank(768, 3072, 0.5, 4) == 384 and kept_rank(10, 10, 0.05, 4) == 1
    model = one_layer(fan_in=24, fan_out=40)
    x = torch.randn(4, 24)
    u, s, vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    truncated = (u[:, :12] * s[:12]) @ vh[:12]
    peftlab.adapt(model, "svft", rank_ratio=0.5)
    assert adapter_of(model).s.numel() == 12 and not adapter_of(model).stackable
    with torch.no_grad():
        assert torch.allclose(model(x), x @ truncated.T + model[0].bias, atol=1e-5)
    assert not peftlab.method_class("svft")(rank_ratio=0.5).identity_at_init


def test_forward_never_forms_the_dense_matrix_in_delta_mode():
    model = peftlab.adapt(one_layer(), "svft", forward="delta")
    adapter = adapter_of(model)
    assert adapter.stackable  # delta mode calls base
    assert adapter.u.shape == (40, 24) and adapter.vh.shape == (24, 24)
    assert all(b is not None for b in (adapter.u, adapter.vh, adapter.sigma))
    assert not any(n for n, _ in adapter.named_buffers() if n in adapter.state_dict())  # recomputed on load
    assert weight_matrix(model[0]).requires_grad is False


@pytest.mark.parametrize("forward", ["factored", "delta"])
@pytest.mark.parametrize("fan_in, fan_out", [(24, 40), (40, 24)])
def test_forward_is_the_dense_formula_with_its_gradients(fan_in, fan_out, forward):
    """Outputs and gradients (s, x) of both forwards equal (W0 + U diag(s − σ) Vᵀ) x + b formed densely."""
    model = one_layer(fan_in, fan_out)
    adapter = adapter_of(peftlab.adapt(model, "svft", forward=forward))
    assert adapter.stackable == (forward == "delta")
    with torch.no_grad():
        adapter.s.mul_(torch.linspace(-0.5, 2.0, adapter.s.numel()))
    layer = model[0]
    x = torch.randn(2, 5, fan_in, requires_grad=True)
    weights = torch.randn(2, 5, fan_out)
    out = model(x)
    fast = torch.autograd.grad((out * weights).sum(), [adapter.s, x])
    delta = (adapter.u * (adapter.s - adapter.sigma)) @ adapter.vh
    expected = x @ (layer.weight.detach() + delta).T + layer.bias
    slow = torch.autograd.grad((expected * weights).sum(), [adapter.s, x])
    assert rel_err(out, expected) <= 1e-5  # factored: up to the SVD round-off of W0
    for got, want in zip(fast, slow):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("options", [{"rank_ratio": 0.0}, {"rank_ratio": 1.5}, {"rank_multiple": 0},
                                     {"forward": "dense"}])
def test_bad_options_raise(options):
    with pytest.raises(peftlab.ConfigError):
        peftlab.method_class("svft")(**options)
