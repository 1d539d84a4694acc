"""BitFit: trainable deltas on existing biases (GPT-2, BERT); LLaMA has none unless add_bias=True."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts

from ..conftest import make_inputs, output_of, perturb_adapters, tiny_bert, tiny_gpt2, tiny_llama

# The property suite trains every case on tiny LLaMA, which has no bias at all: it runs BitFit with
# add_bias=True, which on GPT-2 and BERT (every linear biased) adapts exactly the default targets.
CASES = {"bitfit": {"add_bias": True}}
VARIANTS = [("bitfit", {"add_bias": True, "norms": False})]



def meta_model(kind: str, **sizes):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        if kind == "llama":
            return LlamaForCausalLM(LlamaConfig(**sizes))
        return BertModel(BertConfig(**sizes), add_pooling_layer=False)


@pytest.mark.parametrize("make, kind", [(tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_default_targets_are_every_existing_bias(make, kind):
    model = peftlab.adapt(make(), "bitfit")
    hosted = {p for p, _, _ in hosts(model)}
    biased = {n.rsplit(".", 1)[0] for n, p in make().named_parameters() if n.endswith("bias")}
    assert hosted == biased  # every linear and LayerNorm bias; GPT-2's lm_head has none
    assert peftlab.trainable_parameter_count(model) == sum(
        p.numel() for n, p in make().named_parameters() if n.endswith("bias"))
    assert hosted == {p for p, _, _ in hosts(peftlab.adapt(make(), "bitfit", add_bias=True))}


def test_llama_has_no_bias_and_says_so():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.TargetError, match="no bias terms.*add_bias=True"):
        peftlab.adapt(model, "bitfit")
    assert not peftlab.adapters(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make, kind", [(tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_training_and_merge_change_only_biases(make, kind):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.adapt(model, "bitfit")
    inputs = make_inputs(kind)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"]) if kind == "gpt2" else model(**inputs)
        loss = out.loss if kind == "gpt2" else out.last_hidden_state.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = output_of(model, inputs)
    peftlab.merge(model)
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(after[k], before[k])}
    assert moved == {k for k in before if k.endswith("bias") and "lm_head" not in k}


def test_add_bias_on_llama_trains_projection_biases_and_merges_them_in():
    model = tiny_llama()
    inputs = make_inputs("llama")
    peftlab.adapt(model, "bitfit", add_bias=True)
    assert len(list(hosts(model))) == 2 * 7  # q k v o gate up down per block; RMSNorm has no bias
    perturb_adapters(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
    peftlab.merge(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None and not q_proj.bias.requires_grad
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)


def test_counts_on_published_shapes():
    llama = peftlab.adapt(meta_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
                          "bitfit", add_bias=True)
    assert peftlab.trainable_parameter_count(llama) == 1_359_872
    base = peftlab.adapt(meta_model("bert"), "bitfit")  # BERT-base without its pooler
    assert peftlab.trainable_parameter_count(base) == 102_144
    large = meta_model("bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    total = sum(p.numel() for p in large.parameters())
    peftlab.adapt(large, "bitfit")
    assert peftlab.trainable_parameter_count(large) == 271_360
    assert round(100 * 271_360 / total, 2) == 0.08  # the paper's "0.08% of the parameters" (BERT-large)


def test_norms_false_keeps_layernorm_biases_frozen():
    model = peftlab.adapt(tiny_gpt2(), "bitfit", norms=False)
    assert all(".ln_" not in p for p, _, _ in hosts(model))
    with pytest.raises(peftlab.TargetError, match="bias"):
        peftlab.adapt(tiny_llama(), "bitfit", targets=["q_proj"])  # a bias-free linear is not a target
    with pytest.raises(peftlab.ConfigError):
        peftlab.adapt(tiny_gpt2(), "bitfit", add_bias="no")
