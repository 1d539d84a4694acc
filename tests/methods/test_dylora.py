"""DyLoRA: nested ranks, per-step rank sampling, inference at any rank ≤ r."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core import api
from peftlab.core.method import TrainingStep
from peftlab.methods.dylora import set_inference_rank

from ..conftest import make_inputs, output_of, tiny_llama

CASES = {"dylora": {"r": 4}}
VARIANTS = [("dylora", {"r": 4, "update": "all", "inference_rank": 2, "dropout": 0.1})]


def _adapters(model, name="default"):
    return api.attached_adapters(model, name)


def _randomise_b(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in _adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncation_equals_a_rank_k_lora_with_the_leading_factors(k):
    inputs = make_inputs("llama")
    dy = peftlab.adapt(tiny_llama(), "dylora", r=4, alpha=8.0)
    _randomise_b(dy)
    set_inference_rank(dy, k)
    lora = peftlab.adapt(tiny_llama(), "lora", r=k, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    dy_ad, lora_ad = _adapters(dy), _adapters(lora)
    assert dy_ad.keys() == lora_ad.keys()
    with torch.no_grad():
        for path, adapter in dy_ad.items():
            lora_ad[path].lora_A.copy_(adapter.lora_A[:k])
            lora_ad[path].lora_B.copy_(adapter.lora_B[:, :k])
        assert torch.allclose(output_of(dy, inputs), output_of(lora, inputs), atol=1e-6)
        full = output_of(dy, inputs)
    set_inference_rank(dy, 4)
    if k < 4:  # the truncation really drops something
        with torch.no_grad():
            assert not torch.allclose(output_of(dy, inputs), full, atol=1e-4)


def test_inference_rank_is_saved_and_merged(tmp_path):
    inputs = make_inputs("llama")
    model = peftlab.adapt(tiny_llama(), "dylora", r=4)
    _randomise_b(model)
    set_inference_rank(model, 2)
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_llama(), tmp_path / "a")
    assert peftlab.adapters(fresh)["default"].inference_rank == 2
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-6)
        peftlab.merge(fresh)
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-5)
    with pytest.raises(peftlab.ConfigError):
        set_inference_rank(model, 5)


def test_on_step_samples_one_rank_for_all_layers_reproducibly():
    model = peftlab.adapt(tiny_llama(), "dylora", r=4, seed=7)
    config = peftlab.adapters(model)["default"]
    seen = []
    for s in range(40):
        api.on_step(model, TrainingStep(s, 40, 1e-3, 1e-3))
        ranks = {a.train_rank for a in _adapters(model).values()}
        assert len(ranks) == 1
        seen.append(ranks.pop())
    assert set(seen) == {1, 2, 3, 4}  # uniform over 1..r
    assert seen == [config.sample_rank(s) for s in range(40)]  # a function of (seed, step) only
    other = peftlab.DyLoRA(r=4, seed=8)
    assert seen != [other.sample_rank(s) for s in range(40)]
    bounded = peftlab.DyLoRA(r=4, min_rank=3)
    assert {bounded.sample_rank(s) for s in range(40)} == {3, 4}


@pytest.mark.parametrize("update", ["last", "all"])
def test_only_the_sampled_rank_trains_in_last_mode(update):
    model = peftlab.adapt(tiny_llama(), "dylora", r=4, update=update)
    _randomise_b(model)
    model.train()
    adapter = next(iter(_adapters(model).values()))
    for a in _adapters(model).values():
        a.train_rank = 3
    output_of(model, make_inputs("llama")).pow(2).mean().backward()
    row_grad = adapter.lora_A.grad.abs().sum(1)
    col_grad = adapter.lora_B.grad.abs().sum(0)
    assert row_grad[3] == 0 and col_grad[3] == 0  # beyond the sampled rank
    assert row_grad[2] > 0 and col_grad[2] > 0
    if update == "last":
        assert row_grad[:2].sum() == 0 and col_grad[:2].sum() == 0
    else:
        assert (row_grad[:2] > 0).all() and (col_grad[:2] > 0).all()


def test_scale_is_alpha_over_the_used_rank():
    model = peftlab.adapt(tiny_llama(), "dylora", r=4, alpha=8.0)
    _randomise_b(model)
    adapter = next(iter(_adapters(model).values()))
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    set_inference_rank(model, 2)
    assert torch.allclose(adapter.delta_weight(None), 4.0 * b[:, :2] @ a[:2])


def test_config_errors():
    for bad in ({"r": 0}, {"r": 4, "min_rank": 5}, {"update": "some"}, {"r": 4, "inference_rank": 6}, {"alpha": 0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.DyLoRA(**bad)


def test_trainable_count_on_llama_7b_shapes():
    config = peftlab.DyLoRA()  # r 8 (official scripts)
    assert config.trainable_count(4096, 4096) == 65_536
    q_v = 2 * config.trainable_count(4096, 4096) * 32
    assert q_v == 4_194_304  # default targets q, v; 32 layers


@pytest.mark.parametrize("update", ["last", "all"])
def test_training_output_at_each_sampled_rank_is_the_truncated_lora(update):
    model = peftlab.adapt(tiny_llama(), "dylora", r=4, alpha=8.0, update=update)
    _randomise_b(model)
    model.train()
    adapter = next(iter(_adapters(model).values()))
    x = torch.randn(5, adapter.lora_A.shape[1])
    layer = torch.nn.Linear(adapter.lora_A.shape[1], adapter.lora_B.shape[0]).requires_grad_(False)
    for rank in (1, 2, 3, 4):
        adapter.train_rank = rank
        a, b = adapter.lora_A.detach()[:rank], adapter.lora_B.detach()[:, :rank]
        expected = layer(x) + (8.0 / rank) * x @ a.T @ b.T
        assert torch.allclose(adapter(layer, x, layer), expected, atol=1e-6)


def test_compiled_training_does_not_recompile_for_each_sampled_rank():
    from torch._dynamo.testing import CompileCounter

    model = peftlab.adapt(tiny_llama(), "dylora", r=4)
    model.train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    inputs = make_inputs("llama")
    torch._dynamo.reset()
    for step in range(6):
        api.on_step(model, TrainingStep(step, 6, 1e-3, 1e-3))
        compiled(**inputs)
    assert len({peftlab.adapters(model)["default"].sample_rank(s) for s in range(6)}) > 1  # ranks did change
    assert counter.frame_count == 1
