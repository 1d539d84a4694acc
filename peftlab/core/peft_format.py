"""The HF PEFT LoRA directory format, both ways (what PEFT's ``from_pretrained`` and vLLM read).

Methods opt in: a config with ``to_peft()`` (the LoRA fields of PEFT's adapter_config.json) and a
classmethod ``from_peft(peft_config)`` (a config, or None when the PEFT config is not theirs), an
adapter with ``to_peft()`` / ``from_peft(tensors)`` translating its tensors to PEFT's per-module
keys (``lora_A.weight`` ...). Keys in the file read ``base_model.model.<module path>.<key>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import has_module
from .errors import AdapterFileError, PeftlabError
from .files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _attachment,
    attach_saved,
    read_tensors,
    write_json,
    write_tensors,
)
from .inject import slot_of
from .layers import is_conv1d
from .registry import method_class, method_names
from .targets import candidate_modules

PREFIX = "base_model.model."
# PEFT fields whose non-default value changes what the adapter computes and that peftlab does not map.
_UNSUPPORTED = {
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    "bias": "none", "lora_bias": False, "trainable_token_indices": None, "layer_replication": None,
    "use_qalora": False, "target_parameters": None, "alora_invocation_tokens": None,
}


def export_peft(model: nn.Module, directory: str | os.PathLike, *, name: str = "default") -> Path:
    attachment = _attachment(model, name)
    config = attachment.config
    if not hasattr(config, "to_peft"):
        raise PeftlabError(f"{config.name} has no HF PEFT LoRA equivalent; export format='peft' supports "
                           f"the LoRA family (merge other methods into the base instead)")
    tensors: dict[str, torch.Tensor] = {}
    for path in attachment.paths:
        adapter = slot_of(model.get_submodule(path))[name]
        for key, tensor in adapter.to_peft().items():
            tensors[f"{PREFIX}{path}.{key}"] = tensor
    directory = Path(directory)
    write_tensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CONFIG_FILE, _peft_config(model, attachment.paths, config.to_peft()))
    return directory


def _peft_config(model: nn.Module, paths: list[str], method_fields: dict[str, Any]) -> dict[str, Any]:
    hf_config = getattr(model, "config", None)
    cls_name = type(model).__name__
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if cls_name.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "target_modules": _target_modules(model, paths),
        "fan_in_fan_out": any(is_conv1d(model.get_submodule(p)) for p in paths),
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        **method_fields,
    }


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """Leaf names when they pick out exactly ``paths`` (what vLLM expects), else an exact regex."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    same_leaf = {p for p, _ in candidate_modules(model) if p.rsplit(".", 1)[-1] in leaves}
    if same_leaf == set(paths):
        return leaves
    return "|".join(re.escape(p) for p in paths)


def load_peft(model: nn.Module, directory: Path, peft_config: dict[str, Any], *, name: str) -> nn.Module:
    config = _method_for(peft_config)
    for field_name, default in _UNSUPPORTED.items():
        value = peft_config.get(field_name, default)
        if value not in (default, None, {}, [], "none", False):
            raise AdapterFileError(f"{directory}: PEFT option {field_name}={value!r} is not supported by peftlab")
    raw = _read_peft_tensors(directory)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{directory}: unexpected tensor name {key!r}")
        path, suffix = _split_key(key[len(PREFIX):])
        grouped.setdefault(path, {})[suffix] = tensor
    paths = sorted(grouped)
    missing = [p for p in paths if not has_module(model, p)]
    if missing:
        raise AdapterFileError(f"{directory}: the adapter targets {missing[0]}, which this model does not have")
    config = config.replace(targets=paths)
    tensors = {}
    adapter_type = _adapter_type(config)
    for path in paths:
        for key, tensor in adapter_type.from_peft(grouped[path]).items():
            tensors[f"{path}.{key}"] = tensor
    attach_saved(model, config, paths, tensors, name=name, source=str(directory))
    return model


def _method_for(peft_config: dict[str, Any]):
    for method in method_names():
        cls = method_class(method)
        from_peft = getattr(cls, "from_peft", None)
        config = from_peft(peft_config) if from_peft else None
        if config is not None:
            return config
    kind = peft_config.get("peft_type")
    raise AdapterFileError(f"PEFT adapters of type {kind} are not supported; peftlab reads PEFT LoRA and DoRA")


def _adapter_type(config) -> type:
    adapter_type = getattr(config, "adapter_type", None)
    if adapter_type is None:
        raise AdapterFileError(f"{config.name} cannot read PEFT tensors")
    return adapter_type


def _read_peft_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).is_file():
        return read_tensors(directory / WEIGHTS_FILE)
    legacy = directory / "adapter_model.bin"
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise AdapterFileError(f"{legacy} could not be read ({exc})") from None
    raise AdapterFileError(f"{directory} has neither {WEIGHTS_FILE} nor adapter_model.bin")


_PEFT_SUFFIX = re.compile(r"\.(lora_[A-Za-z_]+(?:\.weight)?)$")


def _split_key(key: str) -> tuple[str, str]:
    match = _PEFT_SUFFIX.search(key)
    if match is None:
        raise AdapterFileError(f"tensor {key!r} is not a LoRA tensor")
    return key[: match.start()], match.group(1)
