"""SSF: y = γ ⊙ layer(x) + β after each targeted linear, merged into that linear."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.budget import architecture_config, meta_model
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix

from ..conftest import perturb_adapters, tiny_bert, tiny_gpt2, tiny_llama

CASES = {"ssf": {}}
VARIANTS = [("ssf", {"init": "normal"}), ("ssf", {"shift": False})]

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}



def test_count_on_llama2_7b_shapes():
    assert peftlab.SSF().trainable_count(4096, 11008) == 2 * 11008
    assert peftlab.SSF(shift=False).trainable_count(11008, 4096) == 4096
    model = meta_model(architecture_config("llama-2-7b"))
    peftlab.adapt(model, "ssf")  # q k v o gate up down
    assert peftlab.trainable_parameter_count(model) == 2_719_744


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_is_scale_and_shift_of_the_layer_output_and_merges_into_that_linear(kind):
    model = peftlab.adapt(MODELS[kind](), "ssf")
    perturb_adapters(model)
    x_by_path = {}
    expected = {}
    with torch.no_grad():
        for path, layer, slot in hosts(model):
            adapter = slot["default"]
            x = torch.randn(2, 3, weight_matrix(layer).shape[1])
            with peftlab.disabled(model):
                plain = layer(x)
            adapted = layer(x)
            assert torch.allclose(adapted, adapter.ssf_scale * plain + adapter.ssf_shift, atol=1e-6)
            x_by_path[path], expected[path] = x, (adapted, adapter.ssf_scale.clone(), weight_matrix(layer).clone())
    peftlab.merge(model)
    with torch.no_grad():
        for path, x in x_by_path.items():
            layer = model.get_submodule(path)
            adapted, scale, matrix = expected[path]
            assert torch.allclose(layer(x), adapted, atol=1e-5), path  # merged linear = unmerged SSF
            assert torch.allclose(weight_matrix(layer), scale[:, None] * matrix, atol=1e-6)
            assert layer.bias is not None  # LLaMA's bias-free projections received β as a new bias


def test_shift_false_merges_into_the_weight_alone():
    model = peftlab.adapt(tiny_llama(), "ssf", shift=False)
    assert peftlab.trainable_parameter_count(model) == sum(m.out_features for _, m, _ in hosts(model))
    perturb_adapters(model)
    peftlab.merge(model)
    assert model.model.layers[0].self_attn.q_proj.bias is None


def test_inits():
    scales = [s["default"].ssf_scale for _, _, s in hosts(peftlab.adapt(tiny_llama(), "ssf"))]
    assert all(torch.equal(s, torch.ones_like(s)) for s in scales)
    torch.manual_seed(0)
    model = peftlab.adapt(tiny_llama(), "ssf", init="normal")  # the official init_ssf_scale_shift
    scale = torch.cat([s["default"].ssf_scale.detach() for _, _, s in hosts(model)])
    shift = torch.cat([s["default"].ssf_shift.detach() for _, _, s in hosts(model)])
    assert abs(scale.mean() - 1) < 0.005 and 0.015 < scale.std() < 0.025
    assert abs(shift.mean()) < 0.005 and 0.015 < shift.std() < 0.025
    assert not peftlab.SSF(init="normal").identity_at_init and peftlab.SSF().identity_at_init


def test_invalid_options_are_refused():
    with pytest.raises(peftlab.ConfigError, match="init"):
        peftlab.adapt(tiny_llama(), "ssf", init="zeros")
    with pytest.raises(peftlab.ConfigError, match="shift"):
        peftlab.adapt(tiny_llama(), "ssf", shift=1)
