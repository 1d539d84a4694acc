"""Norm-layer tuning (GenD): deltas on every norm's weight and bias, exact for any norm formula."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import budget
from peftlab.budget import architecture_config, meta_model
from peftlab.core.inject import hosts
from peftlab.core.layers import is_norm

from ..conftest import VOCAB, make_inputs, output_of, perturb_adapters, tiny_bert, tiny_gpt2, tiny_llama

CASES = {"lntuning": {}}
VARIANTS = [("lntuning", {"bias": False})]

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_gemma(seed: int = 0):
    """Gemma's RMSNorm computes x̂ · (1 + γ), with γ stored at 0."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GemmaForCausalLM(config).eval()



def norm_paths(model):
    return [p for p, m in model.named_modules() if is_norm(m)]


@pytest.mark.parametrize("kind", list(MODELS))
def test_default_targets_are_all_norm_layers_with_weight_and_bias(kind):
    model = peftlab.adapt(MODELS[kind](), "lntuning")
    hosted = [p for p, _, _ in hosts(model)]
    assert hosted == norm_paths(model) and len(hosted) == 5  # 2 per block + final (or embedding) norm
    per_norm = {"llama": 32, "gpt2": 64, "bert": 64}[kind]  # RMSNorm: weight; LayerNorm: weight + bias
    assert peftlab.trainable_parameter_count(model) == 5 * per_norm


def test_count_on_llama2_7b_shapes():
    model = meta_model(architecture_config("llama-2-7b"))
    peftlab.adapt(model, "lntuning")
    assert peftlab.trainable_parameter_count(model) == 65 * 4096 == 266_240
    assert budget.trainable_count(peftlab.LNTuning(), architecture_config("llama-2-7b")) == 266_240


@pytest.mark.parametrize("kind", list(MODELS))
def test_formula_count_reads_biases_from_the_norms(kind):
    model = MODELS[kind]()
    sites = [(m, None) for p, m in model.named_modules() if is_norm(m)]
    with_bias = peftlab.LNTuning().attachment_count(sites)
    assert with_bias == peftlab.trainable_parameter_count(peftlab.adapt(MODELS[kind](), "lntuning"))
    assert peftlab.LNTuning(bias=False).attachment_count(sites) == 5 * 32  # weights only, width 32


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "gemma"])
def test_only_norm_behaviour_changes_and_merged_norms_equal_base_plus_delta(kind):
    make = tiny_gemma if kind == "gemma" else MODELS[kind]
    model = make()
    inputs = make_inputs("bert" if kind == "bert" else "llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = output_of(model, inputs)
    peftlab.adapt(model, "lntuning")
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)  # exactly the base model at init
    perturb_adapters(model)
    deltas = {path: (slot["default"].weight_delta.detach().clone(),
                     None if slot["default"].bias_delta is None else slot["default"].bias_delta.detach().clone())
              for path, _, slot in hosts(model)}
    with torch.no_grad():
        adapted = output_of(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)
    peftlab.merge(model)
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
    after = model.state_dict()
    for key, old in before.items():
        path, leaf = key.rsplit(".", 1)
        if path not in deltas:
            assert torch.equal(after[key], old), key  # nothing but the norms moved
            continue
        weight_delta, bias_delta = deltas[path]
        expected = old + (weight_delta if leaf == "weight" else bias_delta)
        assert torch.allclose(after[key], expected, atol=1e-6), key


def test_delta_is_a_weight_delta_for_gemmas_one_plus_gamma_norm():
    model = tiny_gemma()
    peftlab.adapt(model, "lntuning")
    perturb_adapters(model)
    norm = model.model.layers[0].input_layernorm
    adapter = norm.peftlab["default"]
    assert not adapter.vanishes_at_zero  # N(x; 0) = x̂ for Gemma: the adapter subtracts it
    reference = type(norm)(32, eps=norm.eps)  # a plain Gemma norm with γ0 + Δγ
    with torch.no_grad():
        reference.weight.copy_(norm.weight + adapter.weight_delta)
        x = torch.randn(2, 5, 32)
        assert torch.allclose(norm(x), reference(x), atol=1e-6)
        assert torch.allclose(norm(x), torch.nn.functional.rms_norm(x, (32,), eps=norm.eps) * (1 + reference.weight),
                              atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_equals_the_gradient_of_the_norm_parameters_themselves(kind):
    model = MODELS[kind]()
    full = copy.deepcopy(model)
    inputs = make_inputs(kind)
    peftlab.adapt(model, "lntuning")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    full(**inputs, labels=inputs["input_ids"]).loss.backward()
    for path, norm, slot in hosts(model):
        original = full.get_submodule(path)
        adapter = slot["default"]
        assert adapter.vanishes_at_zero
        assert torch.allclose(adapter.weight_delta.grad, original.weight.grad, atol=1e-6), path
        if adapter.bias_delta is not None:
            assert torch.allclose(adapter.bias_delta.grad, original.bias.grad, atol=1e-6), path
        assert norm.weight.grad is None


def test_bias_false_tunes_weights_only():
    model = peftlab.adapt(tiny_gpt2(), "lntuning", bias=False)
    assert peftlab.trainable_parameter_count(model) == 5 * 32
    assert peftlab.LNTuning(bias=False).trainable_count(32, 32) == 32
    assert peftlab.LNTuning().trainable_count(32, 32) is None  # depends on whether the norm has a bias


def test_targets_must_be_norms_and_options_are_checked():
    with pytest.raises(peftlab.TargetError, match="norm"):
        peftlab.adapt(tiny_llama(), "lntuning", targets=["q_proj"])
    model = peftlab.adapt(tiny_llama(), "lntuning", targets=["model.norm"])
    assert [p for p, _, _ in hosts(model)] == ["model.norm"]
    with pytest.raises(peftlab.ConfigError):
        peftlab.adapt(tiny_llama(), "lntuning", bias="yes")
