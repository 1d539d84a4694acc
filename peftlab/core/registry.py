"""Method name -> config class. Method files register themselves; the core never names a method."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

from .errors import ConfigError, UnknownMethodError
from .method import MethodConfig

_METHODS: dict[str, type[MethodConfig]] = {}
_discovered = False


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method available under ``cls.name``."""
    name = cls.name
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is registered twice ({_METHODS[name].__module__}, {cls.__module__})")
    _METHODS[name] = cls
    return cls


def _discover() -> None:
    """Import every module of peftlab.methods, so that adding a method is adding a file."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("peftlab.methods")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def method_names() -> list[str]:
    _discover()
    return sorted(_METHODS)


def method_class(name: str) -> type[MethodConfig]:
    _discover()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint} (see peftlab.methods())")
    return _METHODS[name]


def make_config(method: str | MethodConfig, options: dict[str, Any]) -> MethodConfig:
    """A config from a registered name or a config object, with ``options`` applied on top."""
    if isinstance(method, MethodConfig):
        return method.replace(**options) if options else method
    if isinstance(method, str):
        return method_class(method).from_options(options)
    raise ConfigError(f"method must be a registered name or a config object, not {type(method).__name__}")
