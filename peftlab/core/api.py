"""The public verbs: adapt, use, disabled, delete, merge, and the queries around them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import calibration, hf
from .errors import ConfigError, MergeError, TargetError
from .inject import (
    BOOK_ATTRIBUTE,
    Attachment,
    attach_layer,
    attach_model,
    book_of,
    detach,
    hosts,
    route,
    slot_of,
)
from .method import LayerAdapter, LayerMethod, MethodConfig, ModelMethod, Site, TrainingStep
from .registry import make_config
from .targets import ADAPTER_CONTAINER, resolve_targets, role_of

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def adapt(
    model: nn.Module,
    method: str | MethodConfig,
    *,
    name: str = "default",
    calibration: Iterable[Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Attach a new adapter to ``model`` in place, make it the active one, and freeze the base.

    ``method`` is a registered name or a config object; ``options`` set its hyperparameters
    (``targets`` among them). Data-dependent methods take ``calibration``: an iterable of batches
    (dicts of model inputs, or tensors) run through the model before the adapters are built.
    On any error the model is left exactly as it was.
    """
    config = make_config(method, options)
    _check_new_name(model, name)
    if isinstance(config, LayerMethod):
        paths = _attach_layers(model, config, name, calibration, restoring=False)
    elif isinstance(config, ModelMethod):
        paths = _attach_model(model, config, name, restoring=False)
    else:
        raise ConfigError(f"{type(config).__name__} is neither a layer nor a model method")
    book = book_of(model, create=True)
    book.attachments[name] = Attachment(config, paths)
    freeze_base(model)
    use(model, name)
    return model


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r} must be an identifier (letters, digits, _ and -)")
    book = book_of(model)
    if book is not None and name in book.attachments:
        raise ConfigError(f"the model already has an adapter named {name!r}; delete it or choose another name")


def _attach_layers(model, config: LayerMethod, name, batches, restoring: bool) -> list[str]:
    targets = config.targets if config.targets is not None else config.default_targets(model)
    paths = resolve_targets(model, targets, accepts=config.accepts, default_roles=config.default_roles,
                            method=config.name, kind=config.kind)
    statistics = {}
    if config.needs_calibration and not restoring:
        if batches is None:
            raise ConfigError(f"{config.name} initialises from data: pass calibration=<batches>")
        statistics = calibration.collect(model, config, paths, batches)
    built: dict[str, LayerAdapter] = {}
    for path in paths:  # build everything before touching the model
        module = model.get_submodule(path)
        site = Site(path, module, role_of(model, path), statistics.get(path), restoring=restoring)
        built[path] = config.build(site).to(site.device)
    config.finish_build(built, restoring)
    for path, adapter in built.items():
        attach_layer(model.get_submodule(path), name, adapter)
    return paths


def _attach_model(model, config: ModelMethod, name, restoring: bool) -> list[str]:
    """Model-level adapters hook the transformer body, so task heads and losses see plain shapes."""
    config.check_model(model)
    adapter = config.build(model, restoring=restoring)
    host = hf.backbone_path(model)
    attach_model(model.get_submodule(host), name, adapter.to(_model_device(model)))
    return [host]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def adapter_parameters(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of the adapters ``names`` (all adapters when None)."""
    wanted = None if names is None else set(names)
    for path, _, slot in hosts(model):
        for adapter_name, adapter in slot.items():
            if wanted is None or adapter_name in wanted:
                prefix = f"{path}.{ADAPTER_CONTAINER}.{adapter_name}".lstrip(".")
                for pname, param in adapter.named_parameters():
                    yield f"{prefix}.{pname}", param


def freeze_base(model: nn.Module) -> None:
    adapter_ids = {id(p) for _, p in adapter_parameters(model)}
    for param in model.parameters():
        if id(param) not in adapter_ids:
            param.requires_grad_(False)


def adapters(model: nn.Module) -> dict[str, MethodConfig]:
    """The adapters attached to ``model``: name -> config."""
    book = book_of(model)
    return {} if book is None else {n: a.config for n, a in book.attachments.items()}


def active(model: nn.Module) -> list[str]:
    book = book_of(model)
    return [] if book is None else list(book.active)


def use(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the active adapter(s), in order (innermost first when they share a layer).

    Only the active adapters' parameters are trainable afterwards.
    """
    names = [names] if isinstance(names, str) else list(names)
    book = _book(model)
    for n in names:
        if n not in book.attachments:
            raise ConfigError(f"no adapter named {n!r}; the model has {', '.join(book.attachments) or 'none'}")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat in {names}")
    _check_stackable(model, names)
    book.active = names
    route(model, names)
    wanted = set(names)
    for _, _, slot in hosts(model):
        for adapter_name, adapter in slot.items():
            adapter.requires_grad_(adapter_name in wanted)
    return model


def _check_stackable(model: nn.Module, names: list[str]) -> None:
    for path, _, slot in hosts(model):
        here = [n for n in names if n in slot]
        if len(here) > 1 and not all(slot[n].stackable for n in here):
            raise ConfigError(f"adapters {here} cannot be stacked on {path}: "
                              f"{', '.join(n for n in here if not slot[n].stackable)} must be alone on its layers")


def _book(model: nn.Module):
    book = book_of(model)
    if book is None or not book.attachments:
        raise ConfigError("the model has no peftlab adapters")
    return book


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: no adapter is applied inside the block; routing is restored after."""
    book = _book(model)
    route(model, [])
    try:
        yield model
    finally:
        route(model, book.active)


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and everything it attached."""
    book = _book(model)
    if name not in book.attachments:
        raise ConfigError(f"no adapter named {name!r}")
    for path in book.attachments.pop(name).paths:
        detach(model.get_submodule(path), name)
    book.active = [n for n in book.active if n != name]
    route(model, book.active)
    if not book.attachments:
        del model.__dict__[BOOK_ATTRIBUTE]
    return model


def merge(model: nn.Module, *, name: str | list[str] | None = None) -> nn.Module:
    """Fold adapters into the base weights and remove them; ``name=None`` merges the active ones.

    Stacked adapters merge innermost first, which is the order in which they compute.
    """
    book = _book(model)
    names = book.active if name is None else ([name] if isinstance(name, str) else list(name))
    if not names:
        raise MergeError("no adapter is active; name the adapter(s) to merge")
    for n in names:
        if n not in book.attachments:
            raise ConfigError(f"no adapter named {n!r}")
        config = book.attachments[n].config
        if not config.mergeable:
            raise MergeError(f"adapter {n!r} ({config.name}) cannot be merged: {config.name} is not a "
                             f"weight update (it changes the computation itself)")
    order = [n for n in book.active if n in names] + [n for n in names if n not in book.active]
    with torch.no_grad():
        for n in order:
            for path in book.attachments[n].paths:
                module = model.get_submodule(path)
                slot_of(module)[n].merge_into(module)
    for n in order:
        delete(model, n)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attached_adapters(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules of adapter ``name``, keyed by host path ("" for the model root)."""
    book = _book(model)
    return {path: slot_of(model.get_submodule(path))[name]
            for path in book.attachments[name].paths}


def _active_configs(model: nn.Module) -> Iterator[tuple[MethodConfig, dict[str, nn.Module]]]:
    book = book_of(model)
    for name in ([] if book is None else book.active):
        yield book.attachments[name].config, attached_adapters(model, name)


def regularization(model: nn.Module) -> torch.Tensor | None:
    """Sum of the active adapters' loss terms (None when none defines one)."""
    terms = [t for config, adapters in _active_configs(model) if (t := config.regularization(adapters)) is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def on_step(model: nn.Module, step: TrainingStep) -> None:
    """Trainer hook: an optimizer step begins."""
    for config, adapters in _active_configs(model):
        config.on_step(adapters, step)


def before_optimizer_step(model: nn.Module, step: TrainingStep) -> None:
    """Trainer hook: gradients are final; the optimizer steps next."""
    for config, adapters in _active_configs(model):
        config.before_optimizer_step(adapters, step)


def check_targets_exist(model: nn.Module, paths: list[str]) -> None:
    missing = [p for p in paths if p and not has_module(model, p)]
    if missing:
        raise TargetError(f"the model has no module {missing[0]!r} (and {len(missing) - 1} more missing)")


def has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
