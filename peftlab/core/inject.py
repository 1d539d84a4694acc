"""Attaching adapters to a model in place, and the per-model record of what is attached.

A module that hosts adapters gets a child ``peftlab`` (an ``AdapterSlot``, keyed by adapter name).
Layers get their ``forward`` overridden on the instance, so the module keeps its class, its
parameter names and everything else that refers to it; the model root hosts model-level adapters
through forward hooks. Detaching restores the module exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from types import MethodType
from typing import Any

from torch import nn

from .layers import is_conv1d
from .method import LayerAdapter, MethodConfig, ModelAdapter
from .targets import ADAPTER_CONTAINER


class AdapterSlot(nn.ModuleDict):
    """The adapters hosted by one module, and which of them run (in order, innermost first)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: tuple[str, ...] = ()
        self.inner_forward = None  # an instance-level forward that was there before us (e.g. accelerate)
        self.hook_handles: list = []
        self.pending: list = []  # per-call state handed from the pre-hook to the post-hook


def slot_of(module: nn.Module) -> AdapterSlot | None:
    slot = module._modules.get(ADAPTER_CONTAINER)
    return slot if isinstance(slot, AdapterSlot) else None


def hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module, AdapterSlot]]:
    """(path, module, slot) for every module of ``model`` that hosts adapters, the root included."""
    for path, module in model.named_modules():
        if ADAPTER_CONTAINER in path.split("."):
            continue
        slot = slot_of(module)
        if slot is not None:
            yield path, module, slot


# --------------------------------------------------------------------------------------------------
# Layers


def _adapted_forward(module: nn.Module, x, *args, **kwargs):
    slot: AdapterSlot = module._modules[ADAPTER_CONTAINER]
    inner = slot.inner_forward or partial(type(module).forward, module)
    if not slot.active:
        return inner(x, *args, **kwargs)
    call = (lambda inp: inner(inp, *args, **kwargs)) if (args or kwargs) else inner
    for name in slot.active:
        call = partial(slot[name], module, base=call)
    return call(x)


def folds_into(layer: nn.Module) -> bool:
    """Whether an adapter's ΔW may ride on the layer's own product, (W + ΔW) x + b, in place of base(x) + ΔW x:
    the layer is a plain linear one (not quantized), its forward is its class's (no accelerate hook), and no
    other adapter is active on it (``base`` would then include that adapter)."""
    slot = slot_of(layer)
    plain = type(layer) is nn.Linear or is_conv1d(layer)
    return plain and slot.inner_forward is None and len(slot.active) == 1


def attach_layer(module: nn.Module, name: str, adapter: LayerAdapter) -> None:
    slot = slot_of(module)
    if slot is None:
        slot = AdapterSlot()
        slot.inner_forward = module.__dict__.get("forward")
        module.add_module(ADAPTER_CONTAINER, slot)
        module.forward = MethodType(_adapted_forward, module)
    slot[name] = adapter.train(module.training)


def detach(module: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``module``; the last one out restores the module entirely."""
    slot = slot_of(module)
    del slot[name]
    slot.active = tuple(n for n in slot.active if n != name)
    if len(slot):
        return
    for handle in slot.hook_handles:
        handle.remove()
    del module._modules[ADAPTER_CONTAINER]
    if slot.inner_forward is not None:
        module.forward = slot.inner_forward
    else:
        module.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------------
# The model root


def _forward_parameter_names(model: nn.Module) -> list[str]:
    params = inspect.signature(type(model).forward).parameters
    return [p for p in params if p != "self"]


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    slot: AdapterSlot = model._modules[ADAPTER_CONTAINER]
    if not slot.active:
        slot.pending.append(None)
        return None
    names = _forward_parameter_names(model)
    kwargs = {**dict(zip(names, args)), **kwargs}
    states = []
    for name in slot.active:
        kwargs, state = slot[name].before(model, kwargs)
        states.append((name, state))
    slot.pending.append(states)
    return (), kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any):
    slot: AdapterSlot = model._modules[ADAPTER_CONTAINER]
    states = slot.pending.pop()
    if states is None:
        return None
    for name, state in reversed(states):
        output = slot[name].after(model, output, state)
    return output


def attach_model(model: nn.Module, name: str, adapter: ModelAdapter) -> None:
    slot = slot_of(model)
    if slot is None:
        slot = AdapterSlot()
        model.add_module(ADAPTER_CONTAINER, slot)
        slot.hook_handles = [
            model.register_forward_pre_hook(_before_forward, with_kwargs=True),
            model.register_forward_hook(_after_forward, with_kwargs=True),
        ]
    slot[name] = adapter.train(model.training)


# --------------------------------------------------------------------------------------------------
# The record of what is attached (a plain attribute of the model, not a module)


@dataclass
class Attachment:
    config: MethodConfig
    paths: list[str]  # hosting module paths ("" is the model root)


@dataclass
class Book:
    attachments: dict[str, Attachment] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


BOOK_ATTRIBUTE = "_peftlab_book"


def book_of(model: nn.Module, create: bool = False) -> Book | None:
    book = model.__dict__.get(BOOK_ATTRIBUTE)
    if book is None and create:
        book = Book()
        model.__dict__[BOOK_ATTRIBUTE] = book
    return book


def route(model: nn.Module, names: list[str]) -> None:
    """Make exactly ``names`` run (in that order) in every hosting module."""
    for _, _, slot in hosts(model):
        slot.active = tuple(n for n in names if n in slot)
