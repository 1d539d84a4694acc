"""(IA)³: vectors scaling k, v and the FFN's inner activation; parity with HF PEFT's IA3."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftlab
from peftlab.budget import architecture_config, meta_model
from peftlab.core.inject import hosts

from ..conftest import make_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama

CASES = {"ia3": {}}
TRAIN_LR = {"ia3": 1e-1}  # a few vectors on a random tiny model move the loss slowly at 3e-2

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# peftlab options that reproduce PEFT's default placement where it departs from k, v, down.
PEFT_PLACEMENT = {"bert": {"targets": ["key", "value", "output.dense"], "feedforward": ("output.dense",)}}


def peft_ia3(model):
    from peft import IA3Config, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is switched on for GPT-2's Conv1D
        return get_peft_model(model, IA3Config())


def randomise_like_peft(peft_model, model, seed=3):
    """Random vectors in PEFT's model, copied into peftlab's adapters at the same paths."""
    gen = torch.Generator().manual_seed(seed)
    ours = {path: slot["default"] for path, _, slot in hosts(model)}
    theirs = {}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".ia3_l." in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
                theirs[name.split("base_model.model.", 1)[1].split(".ia3_l.")[0]] = param
        assert set(theirs) == set(ours)
        for path, param in theirs.items():
            assert ours[path].ia3_l.shape == (param.numel(),)
            assert ours[path].feedforward == (param.shape[0] == 1)  # PEFT: (1, in) input, (out, 1) output
            ours[path].ia3_l.copy_(param.flatten())


@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_and_merged_weights_equal_peft_ia3(kind):
    base = MODELS[kind]()
    theirs = peft_ia3(copy.deepcopy(base))
    ours = peftlab.adapt(base, "ia3", **PEFT_PLACEMENT.get(kind, {}))
    randomise_like_peft(theirs, ours)
    inputs = make_inputs(kind)
    with torch.no_grad():
        expected = output_of(theirs, inputs)
        assert torch.allclose(output_of(ours, inputs), expected, atol=1e-5)
        assert peftlab.trainable_parameter_count(ours) == sum(p.numel() for p in theirs.parameters()
                                                              if p.requires_grad)
        merged_theirs = theirs.merge_and_unload().state_dict()
        merged_ours = peftlab.merge(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_theirs.items():
        assert torch.allclose(merged_ours[key], value, atol=1e-6), key


def test_default_placement_is_k_v_and_the_down_projection_input():
    model = peftlab.adapt(tiny_llama(), "ia3")
    placed = {p.split("layers.0.", 1)[1]: s["default"].feedforward for p, _, s in hosts(model) if "layers.0." in p}
    assert placed == {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}
    bert = peftlab.adapt(tiny_bert(), "ia3")  # the FFN's output dense only, not attention.output.dense
    assert not any("attention.output" in p for p, _, _ in hosts(bert))


def test_count_on_llama2_7b_shapes():
    model = meta_model(architecture_config("llama-2-7b"))
    peftlab.adapt(model, "ia3")
    assert peftlab.trainable_parameter_count(model) == 32 * (4096 + 4096 + 11008) == 614_400
    config = peftlab.IA3()
    assert config.trainable_count(11008, 4096, "down") == 11008 and config.trainable_count(4096, 4096, "k") == 4096
    assert peftlab.IA3(feedforward=("mlp.down_proj",)).trainable_count(11008, 4096, "down") is None


def test_feedforward_by_module_suffix_and_option_checks():
    model = peftlab.adapt(tiny_llama(), "ia3", feedforward=("mlp.down_proj",))
    assert all(s["default"].feedforward == p.endswith("down_proj") for p, _, s in hosts(model))
    for bad in (("",), "down", ("down", 3)):
        with pytest.raises(peftlab.ConfigError):
            peftlab.IA3(feedforward=bad)
