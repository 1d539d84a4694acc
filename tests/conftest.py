"""Tiny random models built from transformers configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 128  # fits the char-level tokenizer below (3 specials + 96 characters)

# Tiny tensors: thread start-up costs more than it saves, and pytest-xdist workers would fight over cores.
torch.set_num_threads(1)


def _random_biases(model, seed: int):
    """transformers starts biases at 0, which would hide how a method's merge treats them."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _random_biases(LlamaForCausalLM(config).eval(), seed)


def lora_llama(checkpointed: bool = False):
    """A tiny Llama in fp64 (exact comparisons) with LoRA r=4 whose B factors are random, so the adapters
    change the output and get gradients in both factors."""
    import peftlab

    model = peftlab.adapt(tiny_llama(), "lora", r=4, dropout=0.0).double().train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _random_biases(GPT2LMHeadModel(config).eval(), seed)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128)
    return _random_biases(BertModel(config, add_pooling_layer=False).eval(), seed)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


def char_tokenizer():
    """A character-level tokenizer: <pad>=0, <s>=1, </s>=2, then printable ASCII and newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(CHARACTERS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.padding_side = "left"
    return tokenizer


def make_inputs(kind: str, batch: int = 2, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def output_of(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def compiled_blocks_output(model, inputs) -> torch.Tensor:
    """``output_of`` (no grad) with each decoder block compiled as the trainer's ``compile`` does, traced by
    dynamo's eager backend with ``fullgraph`` (a graph break raises); the blocks go back to eager after."""
    from peftlab.core.hf import repeated_blocks

    torch._dynamo.reset()
    blocks = repeated_blocks(model.model)
    try:
        for block in blocks:
            block.compile(backend="eager", fullgraph=True)
        with torch.no_grad():
            return output_of(model, inputs)
    finally:
        for block in blocks:
            block._compiled_call_impl = None


@pytest.fixture
def partitioned_compile(monkeypatch):
    """Module.compile with the partitioner inductor uses (what compiled blocks keep and recompute for
    backward), without inductor's slow CPU code generation."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: original(self, backend="aot_eager_decomp_partition"))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert():
    return tiny_bert()


# Helpers of the method tests


def one_layer(fan_in: int = 24, fan_out: int = 40, seed: int = 0, bias: bool = True) -> torch.nn.Sequential:
    """A single seeded linear layer: the smallest model a layer method adapts."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=bias))


def adapter_of(model, name: str = "default"):
    """The first adapter called ``name`` on ``model``."""
    from peftlab.core.inject import hosts

    return next(slot[name] for _, _, slot in hosts(model) if name in slot)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb_adapters(model, seed: int = 7) -> None:
    """Move every trainable parameter away from its init (N(0, 0.3²) noise, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def stack_under_lora(model) -> None:
    """Put a zero-initialised LoRA under adapter "default": each layer still computes W x + b, but the adapter
    is no longer alone on it (so it cannot fold its ΔW into the layer's own product)."""
    import peftlab

    peftlab.adapt(model, "lora", r=2, name="below")
    peftlab.use(model, ["below", "default"])


def dense_reference(layer, x: torch.Tensor, probe: torch.Tensor, delta: torch.Tensor):
    """(W + ΔW) x + b in fp64 for an fp64 ``delta`` (built from leaves that require grad), backwarded against
    ``probe``; returns (output, the fp64 copy of ``x`` that holds its gradient)."""
    from peftlab.core.layers import weight_matrix

    x64 = x.detach().double().requires_grad_()
    bias = None if layer.bias is None else layer.bias.double()
    expected = torch.nn.functional.linear(x64, weight_matrix(layer).double() + delta, bias)
    (expected * probe.double()).sum().backward()
    return expected, x64


def assert_close_fp64(got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` (any float dtype) within 1e-5 of an fp64 ``expected``, relative to its largest entry."""
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def backward_through(layer, fan_in: int, fan_out: int, gen: torch.Generator):
    """A random (5, 7, fan_in) input through ``layer``, backwarded against a random probe: (x, probe, y)."""
    x = torch.randn(5, 7, fan_in, generator=gen).requires_grad_()
    probe = torch.randn(5, 7, fan_out, generator=gen)
    y = layer(x)
    (y * probe).sum().backward()
    return x, probe, y


def assert_same_function(out, expected, pairs, gen: torch.Generator, tol: float = 1e-10) -> None:
    """``out`` equals the reference ``expected`` (both fp64), and after a backward of one random probe through
    each, so do the gradients of every (model leaf, reference leaf) in ``pairs``."""
    assert torch.allclose(out, expected, rtol=tol, atol=tol)
    probe = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    out.backward(probe)
    expected.backward(probe)
    for got, want in pairs:
        assert torch.allclose(got.grad, want.grad, rtol=tol, atol=tol)


def made_by_fold(out: torch.Tensor) -> bool:
    """Whether the folded product (W + s·B A) x + b (core.layers.folded_low_rank) made ``out``; a gain and bias
    after it (DoRA) are one more node."""
    nodes = [out.grad_fn]
    for _ in range(2):
        if any(type(node).__name__.startswith("_FoldedLowRank") for node in nodes):
            return True
        nodes = [nxt for node in nodes if node is not None for nxt, _ in node.next_functions]
    return False
