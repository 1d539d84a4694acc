"""The LLM-Adapters family: LoRA (and PiSSA init), DoRA, series and parallel adapters, soft prompts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import keeps_merged_weight, weight_matrix

from ..conftest import assert_same_function, made_by_fold, make_inputs, output_of, stack_under_lora, tiny_llama

CASES = {
    "lora": {"r": 4},
    "dora": {"r": 4},
    "series": {"bottleneck_size": 8},
    "parallel": {"bottleneck_size": 8},
    "prompt": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix": {"num_virtual_tokens": 4},
}
VARIANTS = [
    ("lora", {"r": 4, "init": "pissa"}),
    ("lora", {"r": 4, "init": "gaussian", "rslora": True}),
    ("series", {"bottleneck_size": 8, "placement": "houlsby"}),
    ("series", {"bottleneck_size": 8, "placement": "pfeiffer", "scaling": "learned"}),
    ("series", {"bottleneck_size": 8, "init": "bert"}),
    ("parallel", {"bottleneck_size": 8, "placement": "mlp", "scaling": 4.0}),
    ("ptuning", {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden_size": 8}),
    ("prefix", {"num_virtual_tokens": 4, "projection": 16}),
    ("prefix", {"num_virtual_tokens": 4, "init": "random"}),
]


def first_adapter(model, name="default"):
    return next(slot[name] for _, _, slot in hosts(model) if name in slot)


def test_lora_init_and_scale():
    model = peftlab.adapt(tiny_llama(), "lora", r=4, alpha=8.0)
    adapter = first_adapter(model)
    bound = 1 / math.sqrt(adapter.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.abs().max() > bound / 2
    assert torch.count_nonzero(adapter.lora_B) == 0 and adapter.scale == 2.0
    model = peftlab.adapt(tiny_llama(), "lora", r=4, alpha=8.0, rslora=True)
    assert first_adapter(model).scale == 4.0


def test_lora_count_on_a_7b_layer():
    assert peftlab.LoRA(r=8).trainable_count(4096, 4096) == 65_536
    assert peftlab.DoRA(r=8).trainable_count(4096, 4096) == 65_536 + 4096


def test_pissa_starts_at_the_principal_singular_triplets():
    model = peftlab.adapt(tiny_llama(), "lora", r=4, alpha=8.0, init="pissa")
    path, module, slot = next(iter(hosts(model)))
    adapter = slot["default"]
    weight = module.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    product = adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()
    assert torch.allclose(product, principal, atol=1e-5)


def test_dora_magnitude_and_norm_without_the_dense_matrix():
    model = peftlab.adapt(tiny_llama(), "dora", r=4)
    _, module, slot = next(iter(hosts(model)))
    adapter = slot["default"]
    assert torch.allclose(adapter.magnitude, module.weight.norm(dim=1))
    with torch.no_grad():
        adapter.lora_B.normal_()
    dense = (module.weight + adapter.scale * adapter.lora_B @ adapter.lora_A).norm(dim=1)
    assert torch.allclose(adapter.row_norm(module), dense, rtol=1e-5)
    merged = adapter.merged_matrix(module)
    assert torch.allclose(merged.norm(dim=1), adapter.magnitude, rtol=1e-5)


def test_series_adapter_runs_before_gate_and_up_and_after_down():
    model = peftlab.adapt(tiny_llama(), "series", bottleneck_size=4, init="bert")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            block = proj.peftlab["default"].block
            assert torch.allclose(proj(x), torch.nn.functional.linear(x + block(x), proj.weight))
        h = torch.randn(1, 3, 48)
        block = mlp.down_proj.peftlab["default"].block
        base = torch.nn.functional.linear(h, mlp.down_proj.weight)
        assert torch.allclose(mlp.down_proj(h), base + block(base))


def test_bottleneck_counts_match_llm_adapters_on_llama_7b():
    # LLM-Adapters' README: AdapterH / Parallel with bottleneck 256 on LLaMA-7B: about 200M.
    series = peftlab.Series()
    per_layer = (series.trainable_count(4096, 11008, "gate") + series.trainable_count(4096, 11008, "up")
                 + series.trainable_count(11008, 4096, "down"))
    assert per_layer * 32 == 201_326_592


def test_learned_scaling_is_one_trainable_scalar():
    model = peftlab.adapt(tiny_llama(), "parallel", bottleneck_size=4, scaling="learned")
    block = first_adapter(model).block
    assert block.learned_scale.shape == (1,) and block.learned_scale.item() == 1.0


def test_prefix_starts_at_the_models_own_keys_and_values():
    model = tiny_llama()
    torch.manual_seed(0)
    peftlab.adapt(model, "prefix", num_virtual_tokens=3, init_token_ids=(7, 8, 9))
    inputs = make_inputs("llama")
    with torch.no_grad():
        with_prefix = output_of(model, inputs)
        with peftlab.disabled(model):
            ids = torch.cat([torch.tensor([[7, 8, 9]]).expand(2, 3), inputs["input_ids"]], 1)
            explicit = model(input_ids=ids).logits[:, 3:]
    assert torch.allclose(with_prefix, explicit, atol=1e-5)


class _OneLinear(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.proj(x)


def test_dora_forward_and_gradients_match_the_dense_formula():
    """float64 against y = W0 x + b + (g - 1)·W0 h + g·s·B A h, g = m / ‖W0 + s·B A‖_row (a constant in
    backward), h = dropout(x); without dropout (or in eval) h = x and this is g·(W0 + s·B A) x + b."""
    gen = torch.Generator().manual_seed(0)
    cases = [(False, 0.0, True), (True, 0.0, True), (True, 0.3, True), (False, 0.3, True), (True, 0.3, False)]
    for (bias, dropout, training), tokens in itertools.product(cases, [(2, 5), (4, 8)]):
        torch.manual_seed(0)
        model = peftlab.adapt(_OneLinear(bias), "dora", r=3, alpha=5.0, dropout=dropout).double()
        model.train(training)
        layer = model.proj
        adapter = first_adapter(model)
        with torch.no_grad():  # ‖W0‖² is taken from the fp32 copy of the weight at build time
            adapter.weight_sq.copy_(layer.weight.pow(2).sum(1))
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen, dtype=torch.float64))
            adapter.magnitude.mul_(1 + 0.3 * torch.rand(adapter.magnitude.shape, generator=gen, dtype=torch.float64))
        a, b, m = (p.detach().clone().requires_grad_() for p in (adapter.lora_A, adapter.lora_B, adapter.magnitude))
        x = torch.randn(*tokens, 12, generator=gen, dtype=torch.float64)
        x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()

        w = layer.weight.detach()
        gain = m / (w + adapter.scale * b @ a).norm(dim=1).detach()
        torch.manual_seed(5)
        h = torch.nn.functional.dropout(x_ref, dropout, training=training)
        expected = (torch.nn.functional.linear(x_ref, w, layer.bias) + (gain - 1) * (h @ w.T)
                    + gain * adapter.scale * (h @ a.T @ b.T))
        torch.manual_seed(5)
        out = model(x_got)
        assert made_by_fold(out) == (tokens == (4, 8) and not (dropout and training))  # 32 tokens > 12·10 / 22·2
        assert_same_function(out, expected, ((x_got, x_ref), (adapter.lora_A, a), (adapter.lora_B, b),
                                             (adapter.magnitude, m)), gen)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_alone_on_a_layer_runs_as_one_merged_product(bias, conv1d):
    """float64 against (W0 + s·B A) x + b: output and the gradients of x, A and B (no dense gradient is formed)."""
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _OneLinear(bias)
    if conv1d:
        model.proj = Conv1D(10, 12).double()
        if not bias:
            model.proj.bias = None
    peftlab.adapt(model, "lora", r=3, alpha=5.0, dropout=0.0).double()
    adapter = first_adapter(model)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen, dtype=torch.float64))
    a, b = (p.detach().clone().requires_grad_() for p in (adapter.lora_A, adapter.lora_B))
    x = torch.randn(4, 8, 12, generator=gen, dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = weight_matrix(model.proj).detach()
    expected = torch.nn.functional.linear(x_ref, weight + adapter.scale * b @ a, model.proj.bias)
    out = model(x_got)
    assert made_by_fold(out)
    assert_same_function(out, expected, ((x_got, x_ref), (adapter.lora_A, a), (adapter.lora_B, b)), gen)
    assert model.proj.weight.grad is None


def test_lora_keeps_the_separate_low_rank_path_where_folding_does_not_pay_or_apply():
    gen = torch.Generator().manual_seed(0)
    model = peftlab.adapt(_OneLinear(True), "lora", r=3, dropout=0.1).double()
    many = torch.randn(4, 8, 12, generator=gen, dtype=torch.float64)
    assert not made_by_fold(model(many))  # dropout sees another input than W
    model.eval()
    assert made_by_fold(model(many))
    assert not made_by_fold(model(many[:1, :1]))  # one token: W + B A costs more than it saves
    stack_under_lora(model)
    assert not made_by_fold(model(many))  # base(x) already holds the other adapter


@pytest.mark.parametrize("budget", [None, 0.5])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_compiled_fold_matches_eager_and_keeps_the_merged_weight_only_without_a_budget(method, budget):
    """Compiled under an activation budget, the fold saves only W itself besides x and the factors; without
    one, it keeps forward's merged W + s·B A for backward instead of W (core.layers.keeps_merged_weight)."""
    torch.manual_seed(0)
    model = peftlab.adapt(_OneLinear(True), method, r=3, dropout=0.0).double()
    with torch.no_grad():
        first_adapter(model).lora_B.normal_()
    x = torch.randn(4, 8, 12, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, *params])
    weight_shaped = []

    def pack(t):
        if t.shape == model.proj.weight.shape:
            weight_shaped.append(t.data_ptr() == model.proj.weight.data_ptr())
        return t

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    within = {} if budget is None else {"activation_memory_budget": budget}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch._functorch.config.patch(**within):
        out = compiled(x)
    assert weight_shaped == [budget is not None]
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out.pow(2).sum(), [x, *params]), expected_grads):
        torch.testing.assert_close(got, want)


def test_compiled_fold_keeps_the_merged_weight_no_larger_than_the_input_and_never_under_a_budget():
    weight = torch.zeros(10, 12)
    assert keeps_merged_weight(weight, torch.zeros(2, 5, 12))
    assert not keeps_merged_weight(weight, torch.zeros(9, 12))  # the copy would outweigh the input kept for backward
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        assert not keeps_merged_weight(weight, torch.zeros(100, 12))


def test_folded_lora_trains_fp32_factors_from_bf16_activations():
    model = _OneLinear(True)
    model.proj = torch.nn.Linear(12, 10, dtype=torch.bfloat16)
    peftlab.adapt(model, "lora", r=3, dropout=0.0)
    adapter = first_adapter(model)
    out = model(torch.randn(4, 8, 12, dtype=torch.bfloat16))
    assert made_by_fold(out) and out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert adapter.lora_A.grad.dtype == adapter.lora_B.grad.dtype == torch.float32
    assert adapter.lora_B.grad.abs().sum() > 0


def test_dora_row_norm_stays_fp32_inside_autocast():
    model = peftlab.adapt(tiny_llama(), "dora", r=4)
    _, module, slot = next(iter(hosts(model)))
    adapter = slot["default"]
    with torch.no_grad():
        adapter.lora_B.normal_()
    dense = (module.weight.double() + adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # only W0 Aᵀ runs in bf16 (as the base GEMM would)
        norm = adapter.row_norm(module)
    assert norm.dtype == torch.float32
    assert ((norm.double() - dense) / dense).abs().max() < 5e-4
