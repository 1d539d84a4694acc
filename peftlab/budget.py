"""Trainable-parameter counts of a method on a model architecture, from shapes alone.

The model is built on the meta device (no memory, no weights), the method's targets are resolved on
it exactly as ``adapt`` would, and the method's documented per-layer formula is summed.
"""

from __future__ import annotations

import torch

from .core.method import LayerMethod, MethodConfig
from .core.targets import resolve_targets, role_of

# Llama-2-7B (LLM-Adapters' LLaMA-7B has the same shapes).
ARCHITECTURES = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "tiny-llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),  # for tests
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256),
}


def architecture_config(name: str):
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    options = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(options.pop("model_type"), **options)


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trainable_count(method: MethodConfig, config) -> int | None:
    """Trainable parameters ``method`` adds to a model of ``config`` (None: depends on the weights)."""
    model = meta_model(config)
    if not isinstance(method, LayerMethod):
        return method.trainable_count_for(config)
    targets = method.targets if method.targets is not None else method.default_targets(model)
    paths = resolve_targets(model, targets, accepts=method.accepts, default_roles=method.default_roles,
                            method=method.name, kind=method.kind)
    return method.attachment_count([(model.get_submodule(p), role_of(model, p)) for p in paths])
