"""DivControl: W0's SVD components split into shared learngenes and K tailors, with a per-task soft gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core import api, layers

from ..conftest import make_inputs, output_of, tiny_llama
from .test_mtlora import (
    ROUTES,
    check_against_reference,
    check_merge_needs_one_task,
    check_routing_is_per_example,
    compiled_block_graphs,
    fit_opposite_tasks,
    perturbed,
    sync_and_gather_ops,
    train_with_task_field,
)

SMALL = {"learngene_r": 2, "tailors": 2, "tailor_r": 2, "embed_dim": 4}
CASES = {"divcontrol": {**SMALL, "tasks": 3, "default_task": 0}}
VARIANTS = [("divcontrol", {"learngene_r": 1, "tailors": 3, "tailor_r": 1, "embed_dim": 2, "tasks": 4,
                            "temperature": 0.5, "default_task": 3})]


def test_two_opposite_tasks_are_routed_to_different_tailors():
    result = fit_opposite_tasks("divcontrol", lr=3e-2, tasks=2, learngene_r=2, tailors=4, tailor_r=2, embed_dim=4)
    shared = fit_opposite_tasks("lora", r=4, dropout=0.0)
    adapter = next(iter(api.attached_adapters(result["model"], "default").values()))
    with torch.no_grad():
        gates = adapter.gate_weights(torch.tensor([0, 1])) / 4
    print(f"\nopposite tasks, MSE: start {result['initial']:.4f}; lora r4 {shared['final']:.4f}; divcontrol "
          f"{result['final']:.4f} (task0 {result['task0']:.4f}, task1 {result['task1']:.4f}); "
          f"gates task0 {[round(g, 3) for g in gates[0].tolist()]} task1 {[round(g, 3) for g in gates[1].tolist()]}")
    assert shared["final"] > 0.9 * shared["initial"]
    assert result["final"] < 0.02 * result["initial"]
    assert (gates[0] - gates[1]).abs().max() > 0.3  # the tasks moved apart from the uniform 0.25


def test_init_splits_the_svd_and_equals_the_base():
    model, inputs = tiny_llama(), make_inputs("llama", batch=2)
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "divcontrol", tasks=2, **SMALL)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    weight = layers.weight_matrix(model.get_submodule(path)).detach().float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    learngene = adapter.learngene_B @ adapter.learngene_A
    second_tailor = adapter.tailor_B[:, 2:] @ adapter.tailor_A[2:]
    assert torch.allclose(learngene, u[:, :2] * s[:2] @ vh[:2], atol=1e-5)  # the top components
    assert torch.allclose(second_tailor, u[:, 4:6] * s[4:6] @ vh[4:6], atol=1e-5)  # components 4 and 5
    assert adapter.gate.abs().sum() == 0
    assert torch.allclose(adapter.gate_weights(torch.tensor([0, 1])), torch.ones(2, 2))
    with torch.no_grad(), peftlab.task_ids([0, 1]):
        assert torch.allclose(output_of(model, inputs), base, atol=1e-5)


def test_forward_is_the_gated_formula():
    model = perturbed("divcontrol", tasks=3, temperature=0.7, **SMALL)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    x, ids = torch.randn(3, 4, layer.in_features), torch.tensor([1, 2, 0])
    with torch.no_grad():
        with peftlab.task_ids(ids):
            got = layer(x)
        residual = layer.weight - adapter.initial_B @ adapter.initial_A
        for b, t in enumerate(ids.tolist()):
            gate = 2 * torch.softmax(adapter.condition_codes[t] @ adapter.gate.T / 0.7, dim=0)
            weight = residual + adapter.learngene_B @ adapter.learngene_A
            for k in range(2):
                part = slice(2 * k, 2 * k + 2)
                weight = weight + gate[k] * adapter.tailor_B[:, part] @ adapter.tailor_A[part]
            assert torch.allclose(got[b], nn.functional.linear(x[b], weight, layer.bias), atol=1e-5)
        # no task ids: the neutral gate, every tailor at weight 1
        neutral = residual + adapter.learngene_B @ adapter.learngene_A + adapter.tailor_B @ adapter.tailor_A
        assert torch.allclose(layer(x), nn.functional.linear(x, neutral, layer.bias), atol=1e-5)


def test_condition_codes_are_fixed_and_distinct():
    model = perturbed("divcontrol", tasks=3, **SMALL)
    first, second = list(api.attached_adapters(model, "default").values())[:2]
    codes = first.condition_codes
    assert torch.equal(codes, second.condition_codes) and not codes.requires_grad
    assert torch.allclose(codes @ codes.T, 4 * torch.eye(3), atol=1e-5)  # orthogonal, norm √embed_dim


def test_mixed_batches_route_each_example_to_its_task():
    assert check_routing_is_per_example("divcontrol", tasks=2, **SMALL) > 1e-3


def test_merge_folds_one_selected_task():
    check_merge_needs_one_task("divcontrol", tasks=2, **SMALL)
    with pytest.raises(peftlab.MergeError, match="select it"):
        peftlab.merge(perturbed("divcontrol", tasks=2, **SMALL))


def test_counts_and_errors():
    assert peftlab.DivControl(tasks=5).trainable_count(4096, 11008) == 24 * (4096 + 11008) + 4 * 32
    with pytest.raises(peftlab.ConfigError, match="exceeds min"):
        peftlab.adapt(tiny_llama(), "divcontrol", learngene_r=9, tailors=2, tailor_r=4)  # 17 > k_proj's 16
    for bad in ({"tailors": 0}, {"temperature": 0.0}, {"embed_dim": -1}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.DivControl(**bad)


def test_trainer_with_a_task_field(tmp_path):
    _, (base, own, swapped) = train_with_task_field(tmp_path, "divcontrol", SMALL)
    print(f"\ndivcontrol trainer: loss base {base:.4f}, own task id {own:.4f}, other task's id {swapped:.4f}")
    assert own < swapped - 0.3 and own < base - 0.3


def gated_reference(adapter, layer, p, x, ids):
    """y_b = (W0 − B0 A0) x_b + b + B_G A_G x_b + Σ_k K·g_k(t_b)·B_k A_k x_b, one example at a time;
    K·g = 1 without ids."""
    tailors, r_t = adapter.tailors, adapter.tailor_r
    weight = layer.weight.detach().double() - adapter.initial_B.double() @ adapter.initial_A.double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    y = nn.functional.linear(x, weight + p["learngene_B"] @ p["learngene_A"], bias)
    rows = []
    for b in range(x.shape[0]):
        if ids is None:
            gate = torch.ones(tailors, dtype=torch.float64)
        else:
            logits = p["gate"] @ adapter.condition_codes[ids[b]].double() / adapter.temperature
            gate = tailors * torch.softmax(logits, dim=0)
        part = sum(gate[k] * x[b] @ p["tailor_A"][k * r_t:(k + 1) * r_t].T @ p["tailor_B"][:, k * r_t:(k + 1) * r_t].T
                   for k in range(tailors))
        rows.append(part)
    return y + torch.stack(rows)


@pytest.mark.parametrize("options", [{**SMALL, "tasks": 3, "temperature": 0.7},
                                     {"learngene_r": 1, "tailors": 3, "tailor_r": 1, "embed_dim": 2, "tasks": 3}])
def test_fast_paths_match_the_reference_formula(options):
    check_against_reference("divcontrol", gated_reference, ROUTES, **options)


def test_compiled_forward_is_one_graph_for_every_route():
    check_against_reference("divcontrol", gated_reference, ROUTES, compiled=True, **SMALL, tasks=3, temperature=0.7)


def test_compiled_blocks_have_no_graph_break_and_one_graph_for_every_layer_and_task():
    # two graphs: the first block's input (from the frozen embedding) needs no gradient, the others' do
    assert compiled_block_graphs("divcontrol", **SMALL, tasks=2, default_task=0) == 2


def test_cached_constants_follow_the_buffers():
    """−B0 and codes / τ are cached; editing or replacing a buffer must be seen."""
    model = perturbed("divcontrol", tasks=3, temperature=0.7, **SMALL)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    x = torch.randn(2, 3, layer.in_features)

    def check():
        with torch.no_grad(), peftlab.task_ids(1):
            p = {name: t.double() for name, t in adapter.named_parameters()}
            expected = gated_reference(adapter, layer, p, x.double(), torch.tensor([1, 1]))
            assert torch.allclose(layer(x).double(), expected, atol=1e-5)

    check()
    with torch.no_grad():
        adapter.initial_B.mul_(1.5)
        adapter.condition_codes.mul_(-1)
    check()
    adapter.initial_B = adapter.initial_B * 2
    adapter.condition_codes = adapter.condition_codes.flip(0).contiguous()
    check()


def test_parameters_are_row_major():
    """The SVD's factors come column-major; a parameter in that layout would get its gradient copied at
    every step."""
    model = perturbed("divcontrol", tasks=2, **SMALL)
    adapter = next(iter(api.attached_adapters(model, "default").values()))
    assert all(p.is_contiguous() for p in adapter.parameters())
    assert adapter.initial_A.is_contiguous() and adapter.initial_B.is_contiguous()


def test_a_one_task_step_makes_no_gather_and_no_sync():
    options = {**SMALL, "tasks": 3, "default_task": 1}
    assert sync_and_gather_ops("divcontrol", **options) == set()
    assert sync_and_gather_ops("divcontrol", [2, 2], **options) == set()
