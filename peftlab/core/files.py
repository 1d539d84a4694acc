"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saved: the method, its options, the hosting module paths, the base model's identity (type, the
shapes of every hosting module's own parameters, a quantized linear layer's as those of the dense
layer it stands for, a fingerprint of its weights) and each adapter's
state dict (parameters and persistent buffers) under ``<module path>.<key>``. Files are written to a
temporary name, flushed and renamed, the config last, so a reader never sees half an adapter.
Loading checks everything before the model is touched and undoes the attachment if the tensors do
not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from . import api
from .errors import AdapterFileError, PeftlabError
from .inject import Attachment, book_of, slot_of
from .layers import features, is_conv1d, is_linear
from .method import LayerMethod, ModelMethod
from .registry import method_class
from .targets import model_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STACK_FILE = "adapter_stack.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Writing


def write_atomically(path: Path, write) -> None:
    """Call ``write(temp_path)`` and move the result to ``path`` only once it is complete on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed ``<module path>.<key>`` (``<key>`` for model-level adapters)."""
    attachment = _attachment(model, name)
    state = {}
    for path in attachment.paths:
        for key, tensor in slot_of(model.get_submodule(path))[name].state_dict().items():
            state[f"{path}.{key}" if path else key] = tensor
    return state


def save(model: nn.Module, directory: str | os.PathLike, *, name: str | list[str] = "default") -> Path:
    """Write adapter ``name`` to ``directory`` (created if needed); returns the directory.

    A list of names saves a stack: one sub-directory per adapter and ``adapter_stack.json`` with the
    order in which they run; ``load`` restores all of them, active in that order.
    """
    directory = Path(directory)
    if not isinstance(name, str):
        names = list(name)
        for adapter_name in names:
            save(model, directory / adapter_name, name=adapter_name)
        write_json(directory / STACK_FILE, {"format": "peftlab-stack", "adapters": names})
        return directory
    attachment = _attachment(model, name)
    config = {
        "format": "peftlab",
        "format_version": FORMAT_VERSION,
        "peftlab_version": __version__,
        "method": attachment.config.name,
        "options": attachment.config.options(),
        "paths": attachment.paths,
        "base": base_identity(model, attachment.paths, isinstance(attachment.config, ModelMethod)),
    }
    write_tensors(directory / WEIGHTS_FILE, adapter_state(model, name))
    write_json(directory / CONFIG_FILE, config)
    return directory


def _attachment(model: nn.Module, name: str) -> Attachment:
    book = book_of(model)
    if book is None or name not in book.attachments:
        have = ", ".join(book.attachments) if book else "none"
        raise PeftlabError(f"no adapter named {name!r} on this model (adapters: {have})")
    return book.attachments[name]


def base_identity(model: nn.Module, paths: list[str], model_level: bool) -> dict[str, Any]:
    config = getattr(model, "config", None)
    shapes = {path: _host_shapes(model, path, model_level) for path in paths}
    return {
        "class": type(model).__name__,
        "model_type": model_type(model),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "shapes": shapes,
        "fingerprint": fingerprint(model, paths),
    }


def _host_module(model: nn.Module, path: str, model_level: bool) -> nn.Module:
    """The module whose shapes identify the base: the host; for model-level adapters, the input embeddings."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if model_level and callable(get_embeddings):
        return get_embeddings()
    return model.get_submodule(path)


def _host_shapes(model: nn.Module, path: str, model_level: bool) -> dict[str, list[int]]:
    """Shapes of the hosting module's own parameters; for model-level adapters, of the input embeddings.

    A linear layer that does not store its weight as a ``weight`` parameter (peftlab.quant.NF4Linear:
    packed 4-bit codes, or a dense copy after a float merge) is recorded by its logical shape, as the
    nn.Linear it stands for, so that an adapter moves between a quantized base and the full-precision one.
    """
    return _shapes_of(_host_module(model, path, model_level))


def _shapes_of(module: nn.Module) -> dict[str, list[int]]:
    shapes = {k: list(p.shape) for k, p in module.named_parameters(recurse=False)}
    if not is_linear(module) or "weight" in shapes:
        return shapes
    fan_in, fan_out = features(module)
    bias = getattr(module, "bias", None)
    return {"weight": [fan_out, fan_in], **({"bias": list(bias.shape)} if isinstance(bias, torch.Tensor) else {})}


def _shapes_fit(saved: Any, module: nn.Module, here: dict[str, list[int]]) -> bool:
    """Whether the shapes saved for a host fit ``module`` (recorded here as ``here``). A linear layer
    also fits the same layer's other record: nn.Linear's (out, in) (saved from an NF4 layer, here a
    Conv1D) and, on a quantized layer, which may stand for a GPT-2 Conv1D, the transposed (in, out).
    The adapter's own tensor shapes are checked again when it is filled."""
    if saved == here:
        return True
    if not isinstance(saved, dict) or not is_linear(module):
        return False
    fan_in, fan_out = features(module)
    bias = {"bias": here["bias"]} if "bias" in here else {}
    forms = [{"weight": [fan_out, fan_in]}]
    if not is_conv1d(module) and "weight" not in dict(module.named_parameters(recurse=False)):
        forms.append({"weight": [fan_in, fan_out]})
    return any(saved == {**form, **bias} for form in forms)


def fingerprint(model: nn.Module, paths: list[str]) -> str:
    """A short hash of a sample of the base weights the adapter sits on."""
    digest = hashlib.sha256()
    for path in sorted(paths)[:8]:
        sample = _weight_sample(model.get_submodule(path))
        if sample is not None:
            digest.update(sample.numpy().round(4).tobytes())
    return digest.hexdigest()[:16]


_pinned_samples: weakref.WeakKeyDictionary[nn.Module, torch.Tensor | None] = weakref.WeakKeyDictionary()


def _weight_sample(module: nn.Module) -> torch.Tensor | None:
    if module in _pinned_samples:
        return _pinned_samples[module]
    weight = getattr(module, "weight", None)
    return weight.detach().reshape(-1)[:512].float().cpu() if isinstance(weight, torch.Tensor) else None


def pin_weight_samples(model: nn.Module) -> None:
    """Take the fingerprint's weight samples now, for weights about to be sharded across processes: afterwards
    no single rank holds a whole weight, and the rank that saves cannot gather one alone."""
    for module in model.modules():
        _pinned_samples[module] = _weight_sample(module)


# --------------------------------------------------------------------------------------------------
# Reading


def read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_FILE}: not an adapter directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} does not hold a JSON object")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is corrupt or truncated ({exc})") from None


def load(model: nn.Module, directory: str | os.PathLike, *, name: str = "default") -> nn.Module:
    """Attach the adapter saved in ``directory`` (peftlab's or an HF PEFT LoRA/DoRA) as ``name``.

    A saved stack is restored whole under its saved names, active in its saved order.
    """
    directory = Path(directory)
    if (directory / STACK_FILE).is_file():
        return _load_stack(model, directory)
    config = read_config(directory)
    if "peft_type" in config:
        from .peft_format import load_peft

        return load_peft(model, directory, config, name=name)
    if config.get("format") != "peftlab":
        raise AdapterFileError(f"{directory / CONFIG_FILE} is neither a peftlab nor an HF PEFT adapter config")
    tensors = read_tensors(directory / WEIGHTS_FILE)
    try:
        method = method_class(config["method"])
        options, paths, base = config["options"], config["paths"], config["base"]
    except KeyError as exc:
        raise AdapterFileError(f"{directory / CONFIG_FILE} lacks the field {exc}") from None
    method_config = method.from_options({**options, "targets": paths} if issubclass(method, LayerMethod) else options)
    check_base(model, base, paths, method_config)
    attach_saved(model, method_config, paths, tensors, name=name, source=str(directory))
    return model


def _load_stack(model: nn.Module, directory: Path) -> nn.Module:
    try:
        names = json.loads((directory / STACK_FILE).read_text())["adapters"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterFileError(f"{directory / STACK_FILE} is corrupt ({exc})") from None
    loaded = []
    try:
        for adapter_name in names:
            load(model, directory / adapter_name, name=adapter_name)
            loaded.append(adapter_name)
    except BaseException:
        for adapter_name in loaded:
            api.delete(model, adapter_name)
        raise
    return api.use(model, names)


def check_base(model: nn.Module, base: dict[str, Any], paths: list[str], config) -> None:
    saved_type, here_type = base.get("model_type"), model_type(model)
    if saved_type and here_type and saved_type != here_type:
        raise AdapterFileError(f"the adapter was trained on a {saved_type} model; this model is {here_type}")
    api.check_targets_exist(model, paths)
    model_level = isinstance(config, ModelMethod)
    here = base_identity(model, paths, model_level)
    for path, shapes in base.get("shapes", {}).items():
        if path not in here["shapes"] or not _shapes_fit(shapes, _host_module(model, path, model_level),
                                                         here["shapes"][path]):
            raise AdapterFileError(f"shape mismatch at {path or 'the model root'}: adapter expects {shapes}, "
                                   f"the model has {here['shapes'].get(path)}")
    if base.get("fingerprint") and base["fingerprint"] != here["fingerprint"]:
        message = ("the base weights differ from those the adapter was made on (fingerprint "
                   f"{base['fingerprint']} vs {here['fingerprint']})")
        if config.derives_from_weights:
            raise AdapterFileError(message + "; this method's state is derived from them, so it cannot load")
        warnings.warn(message, stacklevel=3)


def attach_saved(model, config, paths, tensors, *, name: str, source: str) -> None:
    """Attach ``config`` without initialising it, then fill it from ``tensors``; all or nothing."""
    api._check_new_name(model, name)
    if isinstance(config, LayerMethod):
        api._attach_layers(model, config, name, None, restoring=True)
    elif isinstance(config, ModelMethod):
        api._attach_model(model, config, name, restoring=True)
    book = book_of(model, create=True)
    book.attachments[name] = Attachment(config, list(paths))
    try:
        _fill(model, name, paths, tensors, source)
    except BaseException:
        api.delete(model, name)
        raise
    api.freeze_base(model)
    api.use(model, name)


def _fill(model: nn.Module, name: str, paths: list[str], tensors: dict[str, torch.Tensor], source: str) -> None:
    remaining = dict(tensors)
    for path in paths:
        adapter = slot_of(model.get_submodule(path))[name]
        prefix = f"{path}." if path else ""
        expected = adapter.state_dict()
        part = {}
        for key, current in expected.items():
            saved = remaining.pop(prefix + key, None)
            if saved is None:
                raise AdapterFileError(f"{source}: tensor {prefix + key} is missing")
            if saved.shape != current.shape:
                raise AdapterFileError(f"{source}: tensor {prefix + key} has shape {list(saved.shape)}, "
                                       f"expected {list(current.shape)}")
            part[key] = saved
        adapter.load_state_dict(part, strict=True)
    if remaining:
        raise AdapterFileError(f"{source}: unexpected tensors {sorted(remaining)[:3]} (and "
                               f"{max(0, len(remaining) - 3)} more)")
