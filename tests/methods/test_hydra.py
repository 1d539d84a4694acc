"""Hydra: parallel + sequential low-rank branches compose as y = W0x + b + s·BpApx + s·BsAs(W0x + b)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.core import api, layers

from ..conftest import make_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama

CASES = {"hydra": {"parallel_r": 2, "sequential_r": 4}}
VARIANTS = [("hydra", {"parallel_r": 2, "sequential_r": 3, "scale": 0.5, "dropout": 0.1, "targets": "all-linear"})]


def _randomise(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert])  # layers with a bias (GPT-2's are Conv1D)
def test_branches_compose_as_the_formula(make):
    model = peftlab.adapt(make(), "hydra", parallel_r=2, sequential_r=3, scale=0.7)
    _randomise(model)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    w, b = layers.weight_matrix(layer).detach(), layer.bias.detach()
    x = torch.randn(2, 5, layers.features(layer)[0])
    with torch.no_grad():
        h = F.linear(x, w, b)
        expected = (h + 0.7 * (x @ adapter.parallel_A.T @ adapter.parallel_B.T)
                    + 0.7 * (h @ adapter.sequential_A.T @ adapter.sequential_B.T))
        assert torch.allclose(layer(x), expected, atol=1e-5)
        # each branch matters on its own
        without_seq = h + 0.7 * (x @ adapter.parallel_A.T @ adapter.parallel_B.T)
        assert not torch.allclose(layer(x), without_seq, atol=1e-3)


def test_merge_rewrites_weight_and_bias():
    model = tiny_bert()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()  # make the bias term of the sequential branch visible
    inputs = make_inputs("bert")
    peftlab.adapt(model, "hydra", parallel_r=2, sequential_r=3)
    _randomise(model)
    path, adapter = next(iter(api.attached_adapters(model, "default").items()))
    layer = model.get_submodule(path)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    seq = adapter.sequential_B.detach() @ adapter.sequential_A.detach()
    par = adapter.parallel_B.detach() @ adapter.parallel_A.detach()
    with torch.no_grad():
        before = output_of(model, inputs)
        peftlab.merge(model)
        assert torch.allclose(output_of(model, inputs), before, atol=1e-4)
    assert torch.allclose(layer.weight, w0 + par + seq @ w0, atol=1e-5)
    assert torch.allclose(layer.bias, b0 + seq @ b0, atol=1e-5)


def test_identity_at_init_and_default_placement():
    model = peftlab.adapt(tiny_llama(), "hydra")
    paths = list(api.attached_adapters(model, "default"))
    assert all(p.endswith(("o_proj", "down_proj")) for p in paths) and len(paths) == 4
    adapter = api.attached_adapters(model, "default")[paths[0]]
    assert adapter.parallel_A.shape == (4, 32) and adapter.sequential_A.shape == (8, 32)
    assert adapter.parallel_B.abs().sum() == 0 and adapter.sequential_B.abs().sum() == 0


def test_config_errors():
    for bad in ({"parallel_r": 0}, {"sequential_r": -1}, {"scale": 0.0}, {"dropout": 1.0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.Hydra(**bad)


def test_trainable_count_on_llama_7b_shapes():
    config = peftlab.Hydra()  # r_p 4, r_s 8 (official NLU scripts)
    assert config.trainable_count(4096, 4096) == 4 * 8192 + 2 * 8 * 4096 == 98_304
    per_layer = config.trainable_count(4096, 4096, "o") + config.trainable_count(11008, 4096, "down")
    assert per_layer * 32 == 7_176_192
