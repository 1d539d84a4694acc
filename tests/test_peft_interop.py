"""HF PEFT LoRA/DoRA directories, both ways, against the real ``peft`` package."""

from __future__ import annotations

import pytest
import torch

import peftlab

from .conftest import make_inputs, output_of, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = [("lora", {}), ("lora", {"rslora": True}), ("lora", {"init": "pissa"}), ("dora", {})]


def randomize(model) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method, options", CASES, ids=lambda c: str(c))
def test_export_loads_in_peft_with_equal_outputs(kind, method, options, tmp_path):
    model, inputs = MODELS[kind](), make_inputs(kind)
    peftlab.adapt(model, method, r=4, alpha=8.0, **options)
    randomize(model)
    with torch.no_grad():
        ours = output_of(model, inputs)
    peftlab.export(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(**inputs).logits, ours, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_directory_loads_in_peftlab_with_equal_outputs(kind, use_dora, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=use_dora,
                             fan_in_fan_out=kind == "gpt2", init_lora_weights=False)
    theirs = peft.get_peft_model(MODELS[kind](), config).eval()
    inputs = make_inputs(kind)
    with torch.no_grad():
        reference = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path / "peft")
    model = peftlab.load(MODELS[kind](), tmp_path / "peft")
    assert peftlab.adapters(model)["default"].name == ("dora" if use_dora else "lora")
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), reference, atol=1e-5)


def test_unsupported_peft_options_are_named(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "p")
    with pytest.raises(peftlab.AdapterFileError, match="rank_pattern"):
        peftlab.load(tiny_llama(), tmp_path / "p")


def test_non_lora_methods_do_not_export(tmp_path):
    model = peftlab.adapt(tiny_llama(), "series", bottleneck_size=4)
    with pytest.raises(peftlab.PeftlabError, match="no HF PEFT LoRA equivalent"):
        peftlab.export(model, tmp_path / "x")
