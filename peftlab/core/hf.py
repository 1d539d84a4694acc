"""The few facts about transformers models that differ between releases, in one place.

transformers 5.x renamed the KV-cache argument of ``forward`` from ``past_key_values`` to ``cache``
(and the output field with it); both are supported.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def backbone_path(model: nn.Module) -> str:
    """Path of the transformer body under a task head (``model`` of LlamaForCausalLM), "" if none."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return prefix if isinstance(inner, nn.Module) and inner is not model else ""


def repeated_blocks(body: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``body``: its longest ModuleList whose entries share one class (empty if none)."""
    blocks = max((m for m in body.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    return list(blocks) if blocks is not None and len({type(b) for b in blocks}) == 1 else []


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers checkpoints a module of ``model`` with torch's reentrant checkpoint (also when
    ``use_reentrant`` is not given: torch's default has been reentrant)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(function, "keywords", {}).get("use_reentrant", True):
                return True
    return False


def forces_input_grads(model: nn.Module) -> bool:
    """Whether transformers makes the input embeddings' output require grad (``enable_input_require_grads``,
    which its gradient checkpointing turns on; kept under ``_require_grads_hooks``, in older releases
    ``_require_grads_hook``)."""
    return bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))


def forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def cache_argument(model: nn.Module) -> str | None:
    params = forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def output_cache(output: Any):
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, kv_heads, length, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations have inside the model: autocast's when it is on, else the weights'."""
    param = next(model.parameters())
    device_type = param.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param.dtype


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("the model call has neither input_ids nor inputs_embeds")


def attention_geometry(config: Any) -> tuple[int, int, int, int]:
    """(layers, kv_heads, head_dim, hidden) of a transformers config (the text part of multimodal ones)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return config.num_hidden_layers, kv_heads, head_dim, hidden
