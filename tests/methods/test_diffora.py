"""DiffoRA: the relaxed DAM trains, then selects the top-budget modules by DAM weight."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core import api
from peftlab.core.method import TrainingStep
from peftlab.methods.diffora import dam_parameters, select_modules

from ..conftest import compiled_blocks_output, make_inputs, output_of, tiny_llama

CASES = {"diffora": {"r": 4}}
VARIANTS = [("diffora", {"r": 4, "select_ratio": 0.25, "search_steps": 0, "dropout": 0.0})]


def _setup(**options):
    model = peftlab.adapt(tiny_llama(), "diffora", r=4, dropout=0.0, **options)
    adapters = api.attached_adapters(model, "default")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)
            a.dam_logit.fill_(torch.randn((), generator=gen).item())
    return model, adapters


def test_search_phase_gates_each_module_by_its_dam_weight():
    model, adapters = _setup()
    path, adapter = next(iter(adapters.items()))
    layer = model.get_submodule(path)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        lora = (x @ adapter.lora_A.T @ adapter.lora_B.T) * adapter.scale
        expected = torch.nn.functional.linear(x, layer.weight) + torch.sigmoid(adapter.dam_logit) * lora
        assert torch.allclose(layer(x), expected, atol=1e-6)
    model.train()
    output_of(model, make_inputs("llama")).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in dam_parameters(model))  # the DAM trains


def test_on_step_selects_the_budget_by_dam_weight_at_the_boundary():
    model, adapters = _setup(select_ratio=0.25, search_fraction=0.1)  # 14 sites -> keep round(3.5) = 4
    total = 50  # boundary: ceil(0.1 * 50) = 5
    weights = {p: torch.sigmoid(a.dam_logit).item() for p, a in adapters.items()}
    for s in range(5):
        api.on_step(model, TrainingStep(s, total, 1e-3, 1e-3))
        assert all(bool(a.searching) for a in adapters.values())  # still searching
    api.on_step(model, TrainingStep(5, total, 1e-3, 1e-3))
    chosen = {p for p, a in adapters.items() if bool(a.selected)}
    assert len(chosen) == 4 == peftlab.adapters(model)["default"].budget(len(adapters))
    assert chosen == set(sorted(weights, key=weights.get, reverse=True)[:4])
    assert not any(bool(a.searching) for a in adapters.values())
    # after the search: Γ ∈ {0, 1}; selected modules apply their full LoRA, the others nothing
    for path, a in adapters.items():
        layer = model.get_submodule(path)
        x = torch.randn(2, 3, layer.in_features)
        base = torch.nn.functional.linear(x, layer.weight)
        lora = (x @ a.lora_A.T @ a.lora_B.T) * a.scale
        with torch.no_grad():
            assert torch.allclose(layer(x), base + lora if path in chosen else base, atol=1e-5)
    # unselected LoRAs (and the DAM) no longer receive gradients
    model.train()
    output_of(model, make_inputs("llama")).pow(2).mean().backward()
    for path, a in adapters.items():
        assert a.dam_logit.grad is None or a.dam_logit.grad == 0
        assert (a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0) == (path in chosen)


def test_manual_selection_weight_sharing_and_save_load(tmp_path):
    model, adapters = _setup(search_fraction=1.0)
    api.on_step(model, TrainingStep(10_000, 10_000, 1e-3, 1e-3))
    assert all(bool(a.searching) for a in adapters.values())  # search_fraction=1: never on its own
    before = {p: a.lora_B.detach().clone() for p, a in adapters.items()}
    kept = select_modules(model, k=3)
    assert len(kept) == 3
    assert all(torch.equal(a.lora_B, before[p]) for p, a in adapters.items())  # weights shared, not re-initialised
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_llama(), tmp_path / "a")
    loaded = api.attached_adapters(fresh, "default")
    assert [p for p, a in loaded.items() if bool(a.selected)] == kept
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-6)
        peftlab.merge(fresh)
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-5)
    with pytest.raises(peftlab.ConfigError):
        select_modules(model, k=0)


def test_compiled_blocks_gate_as_eager_in_both_phases():
    """Compiled, the gate is arithmetic on the phase flags (no branch, one graph): σ(α) while searching,
    the 0/1 selection afterwards, as the eager forward's branches."""
    model, _ = _setup(search_fraction=1.0)
    inputs = make_inputs("llama")
    for phase in ("search", "selected"):
        if phase == "selected":
            select_modules(model, k=3)
        with torch.no_grad():
            expected = output_of(model, inputs)
        torch.testing.assert_close(compiled_blocks_output(model, inputs), expected)


def test_config_errors():
    for bad in ({"r": 0}, {"select_ratio": 0.0}, {"select_ratio": 1.5}, {"search_fraction": 2.0},
                {"search_steps": -1}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.DiffoRA(**bad)


def test_trainable_count_on_llama_7b_shapes():
    config = peftlab.DiffoRA()  # r 8 [peftlab default]
    assert config.trainable_count(4096, 4096) == 65_537
    per_layer = 4 * config.trainable_count(4096, 4096) + 2 * config.trainable_count(4096, 11008) \
        + config.trainable_count(11008, 4096)
    assert per_layer * 32 == 19_988_704  # LoRA r=8 on all seven (19,988,480) + 224 DAM entries
