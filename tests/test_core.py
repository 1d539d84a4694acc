"""The core API: targeting, errors on bad input, several adapters, stacking, files."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.core.files import CONFIG_FILE, WEIGHTS_FILE
from peftlab.core.layers import add_product

from .conftest import VOCAB, make_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama


def fingerprint(model) -> tuple:
    """Everything adapt could change: parameter names and flags, module tree, forward overrides."""
    params = tuple((n, p.requires_grad, tuple(p.shape)) for n, p in model.named_parameters())
    modules = tuple((n, type(m).__name__, "forward" in m.__dict__) for n, m in model.named_modules())
    return params, modules, tuple(model.__dict__)


def paths_of(model, name="default"):
    from peftlab.core.inject import book_of

    return book_of(model).attachments[name].paths


# --------------------------------------------------------------------------------------------------
# Targets


def test_default_targets_follow_the_architecture():
    llama = peftlab.adapt(tiny_llama(), "lora", r=2)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths_of(llama)})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gpt2 = peftlab.adapt(tiny_gpt2(), "lora", r=2)
    assert sorted({p.split(".", 3)[-1] for p in paths_of(gpt2)}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj"]
    bert = peftlab.adapt(tiny_bert(), "lora", r=2)
    assert sorted({p.split(".", 3)[-1] for p in paths_of(bert)}) == [
        "attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
        "intermediate.dense", "output.dense"]


def test_series_placements_use_llm_adapters_sites():
    model = peftlab.adapt(tiny_llama(), "series", bottleneck_size=4)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths_of(model)}) == ["down_proj", "gate_proj", "up_proj"]
    model = peftlab.adapt(tiny_llama(), "series", bottleneck_size=4, placement="houlsby")
    assert sorted({p.rsplit(".", 1)[-1] for p in paths_of(model)}) == ["down_proj", "o_proj"]
    model = peftlab.adapt(tiny_llama(), "parallel", bottleneck_size=4)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths_of(model)}) == ["k_proj", "q_proj", "v_proj"]


def test_targets_as_suffixes_regex_and_all_linear():
    model = peftlab.adapt(tiny_llama(), "lora", r=2, targets=["q_proj", "mlp.down_proj"])
    assert len(paths_of(model)) == 4
    model = peftlab.adapt(tiny_llama(), "lora", r=2, targets=r"model\.layers\.0\..*_proj")
    assert len(paths_of(model)) == 7 and all(".layers.0." in p for p in paths_of(model))
    model = peftlab.adapt(tiny_llama(), "lora", r=2, targets="all-linear")
    assert "lm_head" not in paths_of(model) and len(paths_of(model)) == 14


def test_unknown_architecture_gets_every_linear_but_the_head():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    peftlab.adapt(net, "lora", r=2)
    assert paths_of(net) == ["0", "2"]


@pytest.mark.parametrize("targets, message", [
    (["q_porj"], "did you mean q_proj"),
    (["input_layernorm"], "LlamaRMSNorm"),
    ("nothing.*", "match no linear module"),
    ("([", "invalid"),
    ([], "empty"),
])
def test_bad_targets_name_the_problem_and_leave_the_model_alone(targets, message):
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(peftlab.TargetError, match=message if message != "([" else "invalid"):
        peftlab.adapt(model, "lora", r=2, targets=targets)
    assert fingerprint(model) == before


def test_unknown_method_and_options():
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(peftlab.UnknownMethodError, match="did you mean lora"):
        peftlab.adapt(model, "lorra")
    with pytest.raises(peftlab.ConfigError, match="unknown option.*rank"):
        peftlab.adapt(model, "lora", rank=4)
    with pytest.raises(peftlab.ConfigError, match="r must be a positive"):
        peftlab.adapt(model, "lora", r=0)
    with pytest.raises(peftlab.ConfigError, match="exceeds"):
        peftlab.adapt(model, "lora", r=64)
    assert fingerprint(model) == before


def test_config_objects_work_and_options_override_them():
    model = peftlab.adapt(tiny_llama(), peftlab.LoRA(r=3), alpha=6.0)
    config = peftlab.adapters(model)["default"]
    assert (config.r, config.alpha) == (3, 6.0)


# --------------------------------------------------------------------------------------------------
# Several adapters


def test_named_adapters_switch_delete_and_stack():
    model, inputs = tiny_llama(), make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
        peftlab.adapt(model, "lora", r=2, name="a", init="gaussian")
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
        out_a = output_of(model, inputs)
        peftlab.adapt(model, "series", bottleneck_size=4, name="b", init="bert")
        assert peftlab.active(model) == ["b"]
        assert all("peftlab.b." in n for n, p in model.named_parameters() if p.requires_grad)
        out_b = output_of(model, inputs)
        peftlab.use(model, "a")
        assert torch.allclose(output_of(model, inputs), out_a)
        peftlab.use(model, ["a", "b"])
        stacked = output_of(model, inputs)
        assert not torch.allclose(stacked, out_a) and not torch.allclose(stacked, out_b)
        with peftlab.disabled(model):
            assert torch.allclose(output_of(model, inputs), base)
        assert torch.allclose(output_of(model, inputs), stacked)
        peftlab.delete(model, "b")
        assert peftlab.active(model) == ["a"] and torch.allclose(output_of(model, inputs), out_a)
        peftlab.delete(model, "a")
        assert torch.allclose(output_of(model, inputs), base)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any("peftlab" in n for n, _ in model.named_modules())


def test_duplicate_name_and_unknown_name_are_refused():
    model = peftlab.adapt(tiny_llama(), "lora", r=2)
    with pytest.raises(peftlab.ConfigError, match="already has an adapter named 'default'"):
        peftlab.adapt(model, "lora", r=2)
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'x'"):
        peftlab.use(model, "x")
    with pytest.raises(peftlab.ConfigError, match="identifier"):
        peftlab.adapt(model, "lora", r=2, name="a.b")


def test_dora_refuses_to_stack_on_a_shared_layer():
    model = peftlab.adapt(tiny_llama(), "lora", r=2, name="a")
    peftlab.adapt(model, "dora", r=2, name="b")
    with pytest.raises(peftlab.ConfigError, match="cannot be stacked"):
        peftlab.use(model, ["a", "b"])


def test_merge_of_stacked_adapters_keeps_the_function():
    model, inputs = tiny_llama(), make_inputs("llama")
    peftlab.adapt(model, "lora", r=2, name="a", init="gaussian")
    peftlab.adapt(model, "lora", r=2, name="b", init="gaussian")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
        peftlab.use(model, ["a", "b"])
        stacked = output_of(model, inputs)
        peftlab.merge(model)
        assert torch.allclose(output_of(model, inputs), stacked, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Files


def saved(tmp_path, **options):
    model = peftlab.adapt(tiny_llama(), "lora", **{"r": 2, **options})
    peftlab.save(model, tmp_path / "a")
    return tmp_path / "a"


def test_saved_files_are_complete_and_readable(tmp_path):
    directory = saved(tmp_path)
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["method"] == "lora" and config["options"]["r"] == 2
    assert config["base"]["model_type"] == "llama" and len(config["paths"]) == 14
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]), "corrupt or truncated"),
    (lambda d: (d / WEIGHTS_FILE).unlink(), "missing"),
    (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / CONFIG_FILE).unlink(), "not an adapter directory"),
])
def test_damaged_files_give_clear_errors_and_leave_the_model_alone(tmp_path, damage, message):
    directory = saved(tmp_path)
    damage(directory)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(peftlab.AdapterFileError, match=message):
        peftlab.load(model, directory)
    assert fingerprint(model) == before


def test_load_refuses_another_architecture_or_shape(tmp_path):
    directory = saved(tmp_path)
    with pytest.raises(peftlab.AdapterFileError, match="llama model; this model is gpt2"):
        peftlab.load(tiny_gpt2(), directory)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = fingerprint(wider)
    with pytest.raises(peftlab.AdapterFileError, match="shape mismatch"):
        peftlab.load(wider, directory)
    assert fingerprint(wider) == before


def test_tampered_tensor_shapes_roll_back(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(peftlab.AdapterFileError, match="has shape"):
        peftlab.load(model, directory)
    assert fingerprint(model) == before


def test_weight_derived_adapter_refuses_other_base_weights(tmp_path):
    directory = saved(tmp_path, init="pissa")
    with pytest.raises(peftlab.AdapterFileError, match="base weights differ"):
        peftlab.load(tiny_llama(seed=5), directory)
    plain = saved(tmp_path / "plain")
    with pytest.warns(UserWarning, match="base weights differ"):
        peftlab.load(tiny_llama(seed=5), plain)


def test_load_under_another_name_next_to_an_existing_adapter(tmp_path):
    directory = saved(tmp_path)
    model = peftlab.adapt(tiny_llama(), "lora", r=2)
    peftlab.load(model, directory, name="other")
    assert set(peftlab.adapters(model)) == {"default", "other"} and peftlab.active(model) == ["other"]


def test_merge_errors():
    model = peftlab.adapt(tiny_llama(), "prompt", num_virtual_tokens=2)
    with pytest.raises(peftlab.MergeError, match="cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(peftlab.ConfigError, match="no peftlab adapters"):
        peftlab.merge(tiny_llama())


def test_a_stack_saves_and_loads_together(tmp_path):
    model, inputs = tiny_llama(), make_inputs("llama")
    peftlab.adapt(model, "prompt", num_virtual_tokens=2, name="soft")
    peftlab.adapt(model, "lora", r=2, name="low", init="gaussian")
    peftlab.use(model, ["soft", "low"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        stacked = output_of(model, inputs)
    peftlab.save(model, tmp_path / "stack", name=["soft", "low"])
    fresh = peftlab.load(tiny_llama(), tmp_path / "stack")
    assert peftlab.active(fresh) == ["soft", "low"]
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), stacked, atol=1e-5)
    (tmp_path / "stack" / "low" / WEIGHTS_FILE).write_bytes(b"broken")
    other = tiny_llama()
    with pytest.raises(peftlab.AdapterFileError):
        peftlab.load(other, tmp_path / "stack")
    assert not peftlab.adapters(other)


def test_task_ids_are_visible_inside_the_block_only():
    assert peftlab.current_task_ids() is None
    with peftlab.task_ids([0, 2]) as ids:
        assert torch.equal(peftlab.current_task_ids(), ids)
    assert peftlab.current_task_ids() is None
    with pytest.raises(ValueError):
        with peftlab.task_ids(torch.zeros(2, 2, dtype=torch.long)):
            pass


@pytest.mark.parametrize("method, option, value", [("lora", "r", True), ("lora", "r", 0), ("mtlora", "task_r", 2.5),
                                                   ("series", "bottleneck_size", -1)])
def test_integer_options_must_be_positive_integers(method, option, value):
    from peftlab.core.registry import make_config

    with pytest.raises(peftlab.ConfigError, match=f"{method}: {option} must be a positive integer, got {value!r}"):
        make_config(method, {option: value})


@pytest.mark.parametrize("rank", [1, 3])
def test_add_product_is_out_plus_scaled_product_with_its_gradients(rank):
    """One addmm, or for rank one the outer product with its matrix-vector backward: same values either way."""
    gen = torch.Generator().manual_seed(2)
    out, x, weight = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                      for shape in ((2, 5, 7), (2, 5, rank), (7, rank)))
    refs = [t.detach().clone().requires_grad_() for t in (out, x, weight)]
    got = add_product(out, x, weight, scale=0.3)
    assert type(got.grad_fn.next_functions[0][0]).__name__.startswith("_AddOuter") == (rank == 1)
    expected = refs[0] + 0.3 * refs[1] @ refs[2].T
    probe = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got.backward(probe)
    expected.backward(probe)
    assert got.shape == (2, 5, 7) and torch.allclose(got, expected, atol=1e-12)
    for leaf, ref in zip((out, x, weight), refs, strict=True):
        assert torch.allclose(leaf.grad, ref.grad, atol=1e-12)
