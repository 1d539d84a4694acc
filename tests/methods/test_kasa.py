"""kasa: W0 truncated by its r smallest singular triplets (kept, subtracted), LoRA with a learned diagonal."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.core.api import attached_adapters

from ..conftest import adapter_of, one_layer, rel_err, tiny_llama

CASES = {"kasa": {"r": 8}}  # r < 16 = min(in, out) of the tiny k, v projections; big enough to show the truncation
VARIANTS = [("kasa", {"r": 6, "alpha": 12.0, "dropout": 0.05, "orth_form": "reference", "beta": 1e-2})]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_of_depth(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def per_layer_regulariser(adapters, beta: float, gamma: float, orth_form: str) -> torch.Tensor:
    """The spec's L_aux summed layer by layer, in fp64; "reference" forms the full in x in / out x out Grams."""
    terms = []
    for adapter in adapters.values():
        a, b, d = adapter.lora_A.double(), adapter.lora_B.double(), adapter.lora_diag.double()
        if orth_form == "reference":
            gram_a, gram_b = a.T @ a, b @ b.T
        else:
            gram_a, gram_b = a @ a.T, b.T @ b
        gap_a = torch.linalg.norm(gram_a - torch.eye(len(gram_a), dtype=a.dtype))
        gap_b = torch.linalg.norm(gram_b - torch.eye(len(gram_b), dtype=b.dtype))
        terms.append(beta * d.pow(2).sum() + gamma * (gap_b + gap_a))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("orth_form", ["gram", "reference"])
def test_batched_regulariser_and_its_gradients_equal_the_per_layer_sum(orth_form):
    # Every projection: A stacks by in (32, 48) and B by out (32, 16, 48), most groups shared by projections.
    model = peftlab.adapt(llama_of_depth(3), "kasa", r=4, targets=PROJECTIONS, beta=0.3, gamma=0.7, orth_form=orth_form)
    adapters = attached_adapters(model, "default")
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(std=0.3)
    value = peftlab.regularization(model)
    expected = per_layer_regulariser(adapters, 0.3, 0.7, orth_form)
    assert value.dtype == torch.float32 and abs(value.item() - expected.item()) <= 1e-6 * expected.item()
    params = trainable(model)
    assert len(params) == 3 * 3 * len(PROJECTIONS)
    grads = torch.autograd.grad(value, params)
    reference = torch.autograd.grad(expected, params)
    for g, h in zip(grads, reference):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that launch work (views and metadata changes excluded)."""

    free = {torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default,
            torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (torch.Tag.view_copy in func.tags or func.is_view or func in self.free):
            self.count += 1
        return func(*args, **(kwargs or {}))


def regulariser_ops(layers: int, orth_form: str) -> int:
    model = peftlab.adapt(llama_of_depth(layers), "kasa", r=4, targets=PROJECTIONS, orth_form=orth_form)
    with OpCounter() as counter:  # autograd.grad: no .grad accumulation, one op per parameter for any loss term
        torch.autograd.grad(peftlab.regularization(model), trainable(model))
    return counter.count


@pytest.mark.parametrize("orth_form", ["gram", "reference"])
def test_regulariser_ops_do_not_grow_with_depth(orth_form):
    # On a GPU every op is a kernel launch; a per-layer loop made ~56 of them per adapted layer.
    shallow, deep = regulariser_ops(2, orth_form), regulariser_ops(6, orth_form)
    assert deep == shallow


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])  # out < in (where the official code truncates nothing)
def test_truncated_weight_keeps_the_top_k_minus_r_spectrum(shape):
    fan_in, fan_out = shape
    model = one_layer(fan_in, fan_out)
    w0 = model[0].weight.detach().clone()
    sigma = torch.linalg.svdvals(w0)
    adapter = adapter_of(peftlab.adapt(model, "kasa", r=5))
    truncated = adapter.truncated_weight(model[0])
    kept = torch.linalg.svdvals(truncated)
    assert torch.linalg.matrix_rank(truncated) == 24 - 5
    assert torch.allclose(kept[: 24 - 5], sigma[: 24 - 5], rtol=1e-5)
    dropped = (w0 - truncated).pow(2).sum()
    assert abs(dropped - sigma[24 - 5:].pow(2).sum()) <= 1e-4 * dropped
    assert torch.equal(model[0].weight, w0)  # W0 itself is never touched


def test_init_output_is_the_truncated_layer_and_disabled_is_the_original():
    model = one_layer(40, 24)
    x = torch.randn(6, 40)
    with torch.no_grad():
        base = model(x)
        adapter = adapter_of(peftlab.adapt(model, "kasa", r=5))
        expected = x @ adapter.truncated_weight(model[0]).T + model[0].bias
        out = model(x)
        assert torch.allclose(out, expected, atol=1e-6)
        assert rel_err(out, base) > 1e-3
        with peftlab.disabled(model):
            assert torch.equal(model(x), base)
    assert torch.count_nonzero(adapter.lora_B) == 0 and adapter.lora_diag.abs().sum() > 0
    assert not peftlab.method_class("kasa").identity_at_init


def test_trainable_tensors_and_counts():
    model = peftlab.adapt(one_layer(40, 24), "kasa", r=5)
    trainable = {n.rsplit(".", 1)[-1]: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A": 5 * 40, "lora_B": 24 * 5, "lora_diag": 5}
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    method = peftlab.method_class("kasa")
    assert method(r=8).trainable_count(4096, 4096) == 65_544
    assert method(r=32).trainable_count(4096, 4096) == 262_176
    # LLaMA-3-8B, r = 32 on q, k, v, up, down (released commonsense log): 56,628,224
    shapes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)]
    assert 32 * sum(method(r=32).trainable_count(i, o) for i, o in shapes) == 56_628_224


def test_regulariser_values():
    model = peftlab.adapt(tiny_llama(), "kasa", r=4, targets=["q_proj", "up_proj"])
    config = peftlab.adapters(model)["default"]
    adapters = attached_adapters(model, "default")
    assert len(adapters) == 4
    with torch.no_grad():
        for a in adapters.values():
            r, fan_in = a.lora_A.shape
            fan_out = a.lora_B.shape[0]
            a.lora_A.copy_(torch.linalg.qr(torch.randn(fan_in, fan_in))[0][:r])
            a.lora_B.copy_(torch.linalg.qr(torch.randn(fan_out, fan_out))[0][:, :r])
            a.lora_diag.zero_()
    assert config.regularization(adapters).item() < 1e-5
    with torch.no_grad():
        for a in adapters.values():
            a.lora_diag.fill_(1.0)
    l2_only = config.replace(beta=1.0, gamma=0.0)
    assert abs(l2_only.regularization(adapters).item() - 4) < 1e-5  # r per layer, averaged over L_n layers
    assert abs(config.regularization(adapters).item() - 1e-4 * 4) < 1e-6


def test_reference_orthogonality_form_matches_the_full_grams():
    model = peftlab.adapt(tiny_llama(), "kasa", r=4, targets=["up_proj"], beta=0.0, gamma=1.0,
                          orth_form="reference")
    adapters = attached_adapters(model, "default")
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_()
    expected = []
    for a in adapters.values():  # the official loss_fn: AᵀA − I_in and B Bᵀ − I_out
        a_full = a.lora_A.T @ a.lora_A - torch.eye(a.lora_A.shape[1])
        b_full = a.lora_B @ a.lora_B.T - torch.eye(a.lora_B.shape[0])
        expected.append(torch.linalg.norm(a_full) + torch.linalg.norm(b_full))
    expected = torch.stack(expected).mean()
    value = peftlab.regularization(model)
    assert torch.allclose(value, expected, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer calls it: still computed in fp32
        assert torch.allclose(peftlab.regularization(model), value, rtol=1e-6)
    grads = torch.autograd.grad(value, [a.lora_A for a in adapters.values()])
    ref = torch.autograd.grad(expected, [a.lora_A for a in adapters.values()])
    assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-7) for g, h in zip(grads, ref))
    gram = peftlab.adapters(model)["default"].replace(orth_form="gram")
    assert gram.regularization(adapters) < value  # the r x r form has no √(in − r) floor


def test_regulariser_gradient_is_finite_at_init():
    model = peftlab.adapt(tiny_llama(), "kasa", r=4)
    value = peftlab.regularization(model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params)
    assert all(torch.isfinite(g).all() for g in grads)


def test_merge_equals_unmerged_and_unmerging_gives_the_truncated_weight():
    model = one_layer(40, 24)
    x = torch.randn(4, 40)
    adapter = adapter_of(peftlab.adapt(model, "kasa", r=5))
    with torch.no_grad():
        adapter.lora_B.normal_()
        truncated = adapter.truncated_weight(model[0])
        update = adapter.update_weight()
        adapted = model(x)
        peftlab.merge(model)
        assert rel_err(model(x), adapted) <= 1e-5
    assert torch.allclose(model[0].weight - update, truncated, atol=1e-6)


def test_rank_must_leave_a_direction_and_stacking_is_refused():
    with pytest.raises(peftlab.ConfigError):
        peftlab.adapt(one_layer(40, 24), "kasa", r=24)
    model = peftlab.adapt(one_layer(40, 24), "kasa", r=4)
    peftlab.adapt(model, "lora", name="other", r=2)
    with pytest.raises(peftlab.ConfigError):
        peftlab.use(model, ["default", "other"])


@pytest.mark.parametrize("options", [{"r": 0}, {"alpha": 0.0}, {"dropout": -0.1}, {"beta": -1.0},
                                     {"orth_form": "full"}])
def test_bad_options_raise(options):
    with pytest.raises(peftlab.ConfigError):
        peftlab.method_class("kasa")(**options)
