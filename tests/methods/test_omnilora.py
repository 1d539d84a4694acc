"""Omni-LoRA (Omni-AVSR): one shared LoRA (-S), one LoRA per task (-T), or both summed (-ST)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core import api

from ..conftest import make_inputs, output_of, tiny_llama
from .test_mtlora import (
    check_merge_needs_one_task,
    check_routing_is_per_example,
    fit_opposite_tasks,
    perturbed,
    train_with_task_field,
)

CASES = {"omnilora": {"r": 2, "tasks": 3, "default_task": 0}}
VARIANTS = [("omnilora", {"r": 2, "tasks": 2, "strategy": "task", "default_task": 1}),
            ("omnilora", {"r": 2, "tasks": 2, "strategy": "shared", "targets": "all-linear"})]


def test_only_the_task_specific_strategies_fit_two_opposite_tasks():
    results = {s: fit_opposite_tasks("omnilora", strategy=s, r=2, tasks=2, alpha=2.0)
               for s in ("shared", "task", "shared+task")}
    print("\nopposite tasks, MSE: start {:.4f}; ".format(results["shared"]["initial"])
          + "; ".join(f"omnilora {s} {r['final']:.6f}" for s, r in results.items()))
    assert results["shared"]["final"] > 0.9 * results["shared"]["initial"]
    for strategy in ("task", "shared+task"):
        assert results[strategy]["final"] < 0.01 * results[strategy]["initial"], strategy


@pytest.mark.parametrize("strategy", ["shared", "task", "shared+task"])
def test_each_strategy_is_its_formula(strategy):
    model = perturbed("omnilora", strategy=strategy, r=2, tasks=3, alpha=3.0)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    assert path.endswith("q_proj")  # default targets: q and v, as the official code
    layer = model.get_submodule(path)
    x, ids, s = torch.randn(3, 4, layer.in_features), torch.tensor([1, 2, 0]), 3.0 / 2
    with torch.no_grad(), peftlab.task_ids(ids):
        got = layer(x)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.weight, layer.bias)
        if strategy != "task":
            expected = expected + s * x @ adapter.shared_A.T @ adapter.shared_B.T
        if strategy != "shared":
            expected = expected + torch.stack([s * x[b] @ adapter.task_A[t].T @ adapter.task_B[:, t].T
                                               for b, t in enumerate(ids.tolist())])
    assert torch.allclose(got, expected, atol=1e-5)
    assert (adapter.shared_A is None) == (strategy == "task") and (adapter.task_A is None) == (strategy == "shared")


def test_official_init_down_zero_up_kaiming_and_identity():
    model, inputs = tiny_llama(), make_inputs("llama", batch=2)
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "omnilora", r=4, tasks=2)
    adapter = next(iter(api.attached_adapters(model, "default").values()))
    assert adapter.shared_A.abs().sum() == 0 and adapter.task_A.abs().sum() == 0
    bound = 1 / 4**0.5
    assert 0 < adapter.task_B.abs().max() <= bound and adapter.shared_B.abs().max() > 0.5 * bound
    with torch.no_grad(), peftlab.task_ids([0, 1]):
        assert torch.allclose(output_of(model, inputs), base, atol=1e-6)


def test_without_task_ids():
    inputs = make_inputs("llama")
    model = perturbed("omnilora", strategy="task", r=2, tasks=2)
    with pytest.raises(peftlab.ConfigError, match="needs task ids"):
        output_of(model, inputs)
    hybrid = perturbed("omnilora", strategy="shared+task", r=2, tasks=2)
    with torch.no_grad():
        shared_only = output_of(hybrid, inputs)
        with peftlab.task_ids(0):
            assert not torch.allclose(output_of(hybrid, inputs), shared_only, atol=1e-4)


def test_mixed_batches_route_each_example_to_its_task():
    for strategy in ("task", "shared+task"):
        assert check_routing_is_per_example("omnilora", strategy=strategy, r=2, tasks=2) > 1e-3


def test_merge():
    for strategy in ("task", "shared+task"):
        check_merge_needs_one_task("omnilora", strategy=strategy, r=2, tasks=2)
    model, inputs = perturbed("omnilora", strategy="shared", r=2, tasks=2), make_inputs("llama")
    with torch.no_grad():
        before = output_of(model, inputs)
        peftlab.merge(model)  # one LoRA for all tasks: no task to choose
        assert torch.allclose(output_of(model, inputs), before, atol=1e-4)


def test_counts_and_options():
    for strategy, copies in (("shared", 1), ("task", 3), ("shared+task", 4)):
        assert peftlab.OmniLoRA(strategy=strategy, tasks=3).trainable_count(2048, 512) == copies * 64 * 2560
    with pytest.raises(peftlab.ConfigError):
        peftlab.OmniLoRA(strategy="both")


def test_trainer_with_a_task_field(tmp_path):
    _, (base, own, swapped) = train_with_task_field(tmp_path, "omnilora", {"r": 4, "alpha": 8.0})
    print(f"\nomnilora trainer: loss base {base:.4f}, own task id {own:.4f}, other task's id {swapped:.4f}")
    assert own < swapped - 0.3 and own < base - 0.3
