"""PaCA: only the chosen input columns of W train; the choice is saved with the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab.budget import architecture_config, meta_model
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix

from ..conftest import make_inputs, output_of, tiny_gpt2, tiny_llama

CASES = {"paca": {"r": 4}}
VARIANTS = [("paca", {"r": 4, "alpha": 4.0, "seed": 3})]


def llama2_7b_meta():
    return meta_model(architecture_config("llama-2-7b"))


def adapters(model):
    return {path: (module, slot["default"]) for path, module, slot in hosts(model)}


def test_count_on_llama2_7b_shapes():
    config = peftlab.PaCA(r=8)
    assert config.trainable_count(4096, 4096) == 8 * 4096
    assert config.trainable_count(4096, 11008) == 8 * 11008
    assert config.trainable_count(11008, 4096) == 8 * 4096
    model = peftlab.adapt(llama2_7b_meta(), "paca", r=8)  # r = 8, alpha = 16 on q k v o gate up down
    assert peftlab.trainable_parameter_count(model) == 10_878_976


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_only_the_chosen_columns_change_after_training_and_merge(make):
    kind = "llama" if make is tiny_llama else "gpt2"
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.adapt(model, "paca", r=3, seed=0)
    chosen = {path: adapter.columns.clone() for path, (_, adapter) in adapters(model).items()}
    inputs = make_inputs(kind)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)  # attach: no write
    model.eval()
    with torch.no_grad():
        adapted = output_of(model, inputs)
    peftlab.merge(model)
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
    after = model.state_dict()
    for key, old in before.items():
        path = key.rsplit(".", 1)[0]
        if path not in chosen or not key.endswith("weight"):
            assert torch.equal(after[key], old), key  # biases, norms, embeddings, unadapted layers
            continue
        new = weight_matrix(model.get_submodule(path)).detach()
        old_matrix = old.T if kind == "gpt2" else old
        changed = (new != old_matrix).any(dim=0).nonzero().flatten()
        assert torch.equal(changed, chosen[path]), path  # exactly the chosen columns moved, all of them


def test_gradient_is_the_full_gradient_of_the_chosen_columns_times_scale():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16))
    full = copy.deepcopy(base)
    model = peftlab.adapt(base, "paca", r=5, alpha=10.0, seed=1)
    (layer, adapter), = adapters(model).values()
    x = torch.randn(3, 7, 24)
    target = torch.randn(3, 7, 16)
    (model(x) - target).pow(2).mean().backward()
    (full(x) - target).pow(2).mean().backward()
    assert adapter.scale == 2.0
    assert torch.allclose(adapter.delta.grad, adapter.scale * full[0].weight.grad[:, adapter.columns], atol=1e-6)


def test_only_the_selected_activations_are_kept_for_backward():
    torch.manual_seed(0)
    model = peftlab.adapt(nn.Sequential(nn.Linear(64, 40)), "paca", r=4, seed=0)
    x = torch.randn(3, 5, 64)  # an input that needs no gradient, as after a frozen embedding
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        model(x).sum().backward()
    assert any(shape[-1] == 4 and shape.numel() == 3 * 5 * 4 for shape in saved), saved  # x[..., cols]
    assert all(shape.numel() < x.numel() for shape in saved), saved  # the full 64-wide input is not stored


def test_seeded_choice_is_local_reproducible_and_differs_between_layers():
    def choice(rng_seed):
        torch.manual_seed(rng_seed)
        model = peftlab.adapt(tiny_llama(), "paca", r=4, seed=7)
        return {p: a.columns.tolist() for p, (_, a) in adapters(model).items()}

    first, second = choice(1), choice(2)
    assert first == second  # independent of the global RNG
    assert len({tuple(c) for c in first.values()}) > 1  # not the same columns everywhere
    assert all(c == sorted(set(c)) for c in first.values())
    torch.manual_seed(5)
    unseeded = peftlab.adapt(tiny_llama(), "paca", r=4)
    torch.manual_seed(5)
    again = peftlab.adapt(tiny_llama(), "paca", r=4)
    assert [a.columns.tolist() for _, a in adapters(unseeded).values()] == \
           [a.columns.tolist() for _, a in adapters(again).values()]


def test_columns_are_saved_and_restored(tmp_path):
    model = peftlab.adapt(tiny_llama(), "paca", r=4)
    chosen = {p: a.columns.clone() for p, (_, a) in adapters(model).items()}
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_llama(), tmp_path / "a")
    assert all(torch.equal(a.columns, chosen[p]) for p, (_, a) in adapters(fresh).items())


def test_invalid_options_are_refused():
    for options in ({"r": 0}, {"r": 2.5}, {"alpha": 0}, {"seed": -1}, {"seed": "x"}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.adapt(tiny_llama(), "paca", **options)
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(tiny_llama(), "paca", r=33)
