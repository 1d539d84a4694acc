"""TLoRA: tensor-ring-matrix transform of W0 plus a compact residual (arXiv 2501.08727; see tlora.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.tlora import (
    TransformPlan,
    compositions,
    factorize,
    plan_transform,
    ring_matrix,
    tensor_shape,
    tlora_dense_weight,
)

from ..conftest import tiny_gpt2, tiny_llama

CASES = {"tlora": {"r": 2}}
VARIANTS = [
    ("tlora", {"r": 2, "transform_rank": 2, "residual": "tr"}),
    ("tlora", {"r": 2, "transform_rank": 0}),
    ("tlora", {"r": 2, "transform_reg": 0.1}),
]


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def randomise(model, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def explicit_ring(cores: list[torch.Tensor], rows: list[int], cols: list[int]) -> torch.Tensor:
    """T[(i_1..i_D), (j_1..j_D)] = tr(A¹[i_1, j_1] ⋯ A^D[i_D, j_D]), big-endian indices, entry by entry."""
    out = torch.zeros(math.prod(rows), math.prod(cols), dtype=torch.float64)
    for i in itertools.product(*map(range, rows)):
        for j in itertools.product(*map(range, cols)):
            m = torch.eye(cores[0].shape[-2], dtype=torch.float64)
            for d, core in enumerate(cores):
                m = m @ core[i[d], j[d]].double()
            out[sum(i[d] * math.prod(rows[d + 1:]) for d in range(len(rows))),
                sum(j[d] * math.prod(cols[d + 1:]) for d in range(len(cols)))] = torch.trace(m)
    return out


def test_tensor_ring_matrix_and_its_identity_init():
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(a, b, 2, 2, generator=gen, dtype=torch.float64) for a, b in ((2, 3), (3, 2), (2, 2))]
    assert torch.allclose(ring_matrix(cores), explicit_ring(cores, [2, 3, 2], [3, 2, 2]), atol=1e-10)
    kron = [torch.randn(s, s, 1, 1, generator=gen, dtype=torch.float64) for s in (2, 3, 4)]
    expected = torch.kron(torch.kron(kron[0][..., 0, 0], kron[1][..., 0, 0]), kron[2][..., 0, 0])
    assert torch.allclose(ring_matrix(kron), expected, atol=1e-12)  # rank 1 = the code's seq_kronecker
    model = peftlab.adapt(tiny_llama(), "tlora", transform_rank=3)
    for _, adapter in adapters_of(model):
        assert torch.allclose(adapter.transform_matrix(), torch.eye(adapter.fan_in), atol=1e-6)  # Prop. 1


@pytest.mark.parametrize("options", [{}, {"transform_rank": 2, "residual": "tr", "r": 2}])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forward_equals_the_codes_dense_weight(options, make):
    model = peftlab.adapt(make(), "tlora", **options)
    randomise(model)
    for layer, adapter in adapters_of(model):
        x = torch.randn(2, 3, adapter.fan_in)
        dense = tlora_dense_weight(adapter, layer)  # W0 T + s·Δ, as the code builds it each forward
        assert torch.allclose(dense, weight_matrix(layer).detach() @ adapter.transform_matrix()
                              + adapter.scale * adapter.residual_matrix(), atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, dense, layer.bias), atol=1e-5)


def test_tensor_ring_residual_is_the_codes_ttv():
    model = peftlab.adapt(tiny_llama(), "tlora", residual="tr", r=2)
    randomise(model, scale=0.5)
    layer, adapter = adapters_of(model)[5]  # up_proj: 32 -> 48
    out_shape, in_shape = [c.shape[0] for c in adapter.out_cores], [c.shape[0] for c in adapter.in_cores]
    assert (tuple(out_shape), tuple(in_shape)) == ((3, 4, 4), (2, 4, 4))
    # Δ[(o), (j)] = tr(B¹[o1] B²[o2] B³[o3] C¹[j1] C²[j2] C³[j3]): one ring over output then input cores
    cores = [c[:, None] for c in adapter.out_cores] + [c[None, :] for c in adapter.in_cores]
    expected = explicit_ring(cores, out_shape + [1] * 3, [1] * 3 + in_shape)
    assert torch.allclose(adapter.residual_matrix().double(), expected, atol=1e-5)


def test_tr_residual_init_is_zero_and_uses_the_codes_scales():
    torch.manual_seed(0)
    model = peftlab.adapt(tiny_llama(), "tlora", residual="tr", r=4)
    _, adapter = adapters_of(model)[0]
    assert torch.count_nonzero(adapter.out_cores[0]) == 0 and torch.count_nonzero(adapter.residual_matrix()) == 0
    assert abs(adapter.in_cores[2].std().item() - 1 / math.sqrt(4)) < 0.1
    assert abs(adapter.out_cores[1].std().item() - math.sqrt(4) / 16) < 0.03


def test_identity_regulariser():
    model = peftlab.adapt(tiny_llama(), "tlora", transform_rank=2, transform_reg=0.5)
    assert peftlab.regularization(model).item() == 0.0
    _, adapter = adapters_of(model)[0]
    with torch.no_grad():
        adapter.transform[0][0, 1, 0, 1] += 3.0  # ‖A¹[:, :, 0, 1] − I/2‖_F becomes 3
    assert math.isclose(adapter.regularization().item(), 0.5 * 3.0, rel_tol=1e-6)
    assert peftlab.regularization(peftlab.adapt(tiny_llama(), "tlora")) is None


def test_tensorisation():
    assert tensor_shape(1280, 3, None) == (8, 10, 16)  # the code's table for SD widths
    assert tensor_shape(320, 3, None) == (4, 8, 10) and factorize(320, 3) == (5, 8, 8)
    assert factorize(4096, 3) == (16, 16, 16) and factorize(11008, 3) == (16, 16, 43)
    assert factorize(97, 3) == (1, 1, 97) and factorize(32, 3) == (2, 4, 4)
    assert tensor_shape(32, 3, {"32": [4, 8, 1]}) == (4, 8, 1)
    with pytest.raises(peftlab.ConfigError, match="multiply"):
        peftlab.TLoRA(tensor_shapes={"32": [4, 4]})


def test_counts_on_llama_2_7b():
    config = peftlab.TLoRA()  # r 1, Kronecker transform, LoRA residual
    q = config.trainable_count(4096, 4096)
    assert q == 3 * 16**2 + (4096 + 4096) == 8960
    up, down = config.trainable_count(4096, 11008), config.trainable_count(11008, 4096)
    assert down == 2 * 16**2 + 43**2 + 15104
    assert 32 * (4 * q + 2 * up + down) == 2_721_568 and 32 * 4 * q == 1_146_880
    tr = peftlab.TLoRA(r=6, transform_rank=2, residual="tr")
    assert tr.trainable_count(4096, 4096) == 4 * 768 + 36 * 96


def reference_forward(adapter, layer, x, params):
    """y = x (W0 T)ᵀ + b + s·x Δᵀ, written out densely in float64 from (float64 copies of) the parameters:
    T = the Kronecker product of the rank-1 cores; Δ = B A, or the TR chain over output then input cores."""
    p = dict(params)
    w = weight_matrix(layer).detach().double()
    t = torch.ones(1, 1, dtype=torch.float64)
    for d in range(len(adapter.transform)):
        t = torch.kron(t, p[f"transform.{d}"][:, :, 0, 0])
    if adapter.residual_kind == "lora":
        delta = p["lora_B"] @ p["lora_A"]
    else:
        def chain(prefix, count):
            out = p[f"{prefix}.0"]
            for d in range(1, count):
                core = p[f"{prefix}.{d}"]
                out = torch.einsum("pab,jbc->pjac", out, core).reshape(-1, out.shape[1], core.shape[2])
            return out
        cout, cin = chain("out_cores", len(adapter.out_cores)), chain("in_cores", len(adapter.in_cores))
        delta = torch.einsum("oab,jba->oj", cout, cin)
    y = x @ (w @ t).T + adapter.scale * x @ delta.T
    return y if layer.bias is None else y + layer.bias.detach().double()


def assert_matches_the_dense_formula(model, tol, lead=(2, 3), seed=1):
    """Outputs and the gradients wrt x and every trainable parameter against autograd through the dense
    formula in float64, with and without a gradient for x."""
    gen = torch.Generator().manual_seed(seed)
    for layer, adapter in adapters_of(model):
        names = [name for name, p in adapter.named_parameters() if p.requires_grad]
        for x_grad in (True, False):
            x = torch.randn(*lead, adapter.fan_in, generator=gen, dtype=torch.float64, requires_grad=x_grad)
            y = layer(x)
            weights = torch.randn(y.shape, generator=gen, dtype=torch.float64)
            inputs = ([x] if x_grad else []) + [adapter.get_parameter(n) for n in names]
            grads = torch.autograd.grad((y * weights).sum(), inputs)
            params = [(n, adapter.get_parameter(n).detach().double().requires_grad_()) for n in names]
            x_ref = x.detach().requires_grad_(x_grad)
            expected = reference_forward(adapter, layer, x_ref, params)
            torch.testing.assert_close(y, expected, **tol)
            ref_inputs = ([x_ref] if x_grad else []) + [p for _, p in params]
            ref_grads = torch.autograd.grad((expected * weights).sum(), ref_inputs)
            for actual, want, leaf in zip(grads, ref_grads, inputs):
                assert actual.dtype == leaf.dtype
                torch.testing.assert_close(actual.double(), want, **tol)


def pin_plan(model, plan):
    for _, adapter in adapters_of(model):
        adapter.plan_override = plan


PLANS = [TransformPlan(groups, folded) for groups in compositions(3) for folded in (False, True)]


@pytest.mark.parametrize("plan", [None, *PLANS], ids=lambda p: "auto" if p is None else
                         f"{'fold' if p.folded else 'tokens'}-{'.'.join(map(str, p.groups))}")
@pytest.mark.parametrize("cast", [True, False], ids=["fp32-params", "fp64-params"])
@pytest.mark.parametrize("options", [{"r": 3, "alpha": 2.0},
                                     {"r": 2, "tensor_shapes": {"32": [4, 8, 1], "48": [3, 1, 16], "128": [1, 16, 8]}},
                                     {"r": 2, "residual": "tr"}])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_every_plan_matches_the_dense_formula(make, options, cast, plan):
    """Each way to run the Kronecker transform (modes merged into fewer factors, on the activations or folded
    into the weight's rows; factors cast together, s on GEMM alphas, operands recomputed in backward)
    computes the dense formula's function. The TR residual never folds."""
    if plan is not None and plan.folded and options.get("residual") == "tr":
        pytest.skip("the TR residual runs on the activations only")
    model = peftlab.adapt(make().double(), "tlora", **options)
    if not cast:
        model.double()  # adapter parameters in the activations' dtype: no cast at all
    randomise(model, scale=0.3)
    pin_plan(model, plan)
    tol = {"rtol": 1e-5, "atol": 1e-6} if cast else {"rtol": 1e-9, "atol": 1e-10}
    assert_matches_the_dense_formula(model, tol)


def test_cost_model_picks_each_path_on_tiny_widths():
    """The plan is the cost model's cheapest: on the activations for a few tokens, folded into the weight
    once the tokens outnumber the weight's rows enough to pay for the weight's gradient, never folded where
    the layer cannot take it; forward and backward match the dense formula either way."""
    shape = (2, 4, 4)  # tiny Llama's 32
    assert not plan_transform(6, 48, shape, True).folded
    assert plan_transform(4096, 48, shape, True).folded and not plan_transform(4096, 48, shape, False).folded
    model = peftlab.adapt(tiny_llama().double(), "tlora", r=2)
    randomise(model, scale=0.3)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for lead, folded in (((2, 3), False), ((4, 1024), True)):
        for layer, adapter in adapters_of(model):
            x2d = torch.zeros(math.prod(lead), adapter.fan_in, dtype=torch.float64)
            assert adapter.transform_plan(x2d, adapter.can_fold(layer, torch.float64)).folded == folded
        assert_matches_the_dense_formula(model, tol, lead)


def test_cost_model_on_llama_3_2_1b_shapes():
    """The rule the docstring states for an H100 at 8192 tokens: q, k, v, o fold with T dense on W0's rows,
    down folds with F_1 | F_2 ⊗ F_3, gate and up stay on the activations with T dense; at 256 tokens
    nothing folds."""
    hidden, inter = (8, 16, 16), (16, 16, 32)
    dense_folded = TransformPlan((3,), True)
    assert plan_transform(8192, 2048, hidden, True) == dense_folded == plan_transform(8192, 512, hidden, True)
    assert plan_transform(8192, 8192, hidden, True) == TransformPlan((3,), False)
    assert plan_transform(8192, 2048, inter, True) == TransformPlan((1, 2), True)
    assert not any(plan_transform(256, out, shape, True).folded
                   for out, shape in ((2048, hidden), (512, hidden), (8192, hidden), (2048, inter)))


def test_folding_needs_a_frozen_weight_in_the_gemm_dtype():
    model = peftlab.adapt(tiny_llama().double(), "tlora")
    layer, adapter = adapters_of(model)[0]
    assert adapter.can_fold(layer, torch.float64) and not adapter.can_fold(layer, torch.float32)
    layer.weight.requires_grad_(True)
    assert not adapter.can_fold(layer, torch.float64)
    layer.weight.requires_grad_(False)
    adapter.plan_override = TransformPlan((3,), folded=True)
    with pytest.raises(ValueError, match="cannot take it"):
        adapter.forward(layer, torch.zeros(1, adapter.fan_in, dtype=torch.float32), layer)


@pytest.mark.parametrize("plan", [None, *PLANS], ids=lambda p: "auto" if p is None else
                         f"{'fold' if p.folded else 'tokens'}-{'.'.join(map(str, p.groups))}")
def test_backward_keeps_no_token_sized_intermediate(plan):
    """Autograd keeps x and small tensors only: the transform's intermediate mode products are recomputed
    in backward (the 1B-shape step kept three extra copies of the input per projection before), and a
    folded W0 T + s·B A is built again rather than kept."""
    model = peftlab.adapt(tiny_llama(), "tlora")
    layer, adapter = next((m, a) for m, a in adapters_of(model) if a.fan_in == 48)  # down_proj: 16·3 modes
    adapter.plan_override = plan
    x = torch.randn(256, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    kept = {x.untyped_storage().data_ptr(), layer.weight.untyped_storage().data_ptr()}
    big = [tuple(t.shape) for t in saved  # merged factors (at most in x in) are fine, a merged W0 T is not
           if (t.numel() >= x.numel() or t.shape == layer.weight.shape) and t.untyped_storage().data_ptr() not in kept]
    assert not big, big
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in adapter.parameters())


def test_fused_function_inside_an_autocast_region():
    """fp32 model and activations under bf16 autocast (the trainer's setting): the function runs its GEMMs
    in bf16 like autocast would, and its backward (which autocast does not reach) sees one dtype."""
    model = peftlab.adapt(tiny_llama(), "tlora", r=2)
    randomise(model)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss32, grads32), (loss16, grads16) = results
    assert abs(loss16 - loss32) < 0.02 * loss32
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == torch.float32 and (g16 - g32).norm() <= 0.1 * g32.norm() + 1e-6


@pytest.mark.parametrize("plan", [TransformPlan((3,), True), TransformPlan((1, 2), True)], ids=["dense", "split"])
def test_compiled_fold_matches_eager_and_keeps_no_merged_weight(plan):
    """Compiled, the folded function is the eager one, and the forward graph hands backward no weight-sized
    tensor but W0 itself (LoRA's traced fold kept its W + s·B A: core.layers runs it as an opaque op)."""
    from torch._dynamo.backends.common import aot_autograd

    model = nn.Sequential(nn.Linear(48, 40, dtype=torch.float64))
    peftlab.adapt(model, "tlora", r=2, targets=["0"], tensor_shapes={"48": [2, 4, 6]}).double()
    randomise(model, scale=0.3)
    layer, adapter = adapters_of(model)[0]
    adapter.plan_override = plan
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    params = [p for p in adapter.parameters() if p.requires_grad]
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, *params])
    kept = []

    def forward_compiler(graph, inputs):
        output = next(node for node in graph.graph.nodes if node.op == "output")
        kept.extend((tuple(node.meta["val"].shape), node.op) for node in output.args[0][1:] if node is not None)
        return graph.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True)(x)
    assert [op for shape, op in kept if shape == tuple(layer.weight.shape)] == ["placeholder"]
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out.pow(2).sum(), [x, *params]), expected_grads):
        torch.testing.assert_close(got, want)
