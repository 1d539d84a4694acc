"""peftlab: parameter-efficient fine-tuning for any torch.nn.Module.

    import peftlab
    peftlab.adapt(model, "lora", r=16, alpha=32)     # in place; the model keeps its class
    peftlab.save(model, "out/")                      # adapter_config.json + adapter_model.safetensors
    peftlab.merge(model)                             # fold into the base weights

Config classes of registered methods are attributes too: ``peftlab.LoRA(r=16)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

# peftlab.methods() -> registered names (the package is callable); peftlab.adaptation.LAME(...) and the
# other test-time and black-box adapters.
from . import adaptation, methods, quant  # noqa: E402  quant: NF4 bases, peftlab.quant.quantize(model)
from .core.api import (  # noqa: E402
    active,
    adapt,
    adapter_parameters,
    adapters,
    delete,
    disabled,
    merge,
    regularization,
    trainable_parameter_count,
    use,
)
from .core.errors import (  # noqa: E402
    AdapterFileError,
    ConfigError,
    MergeError,
    PeftlabError,
    TargetError,
    UnknownMethodError,
)
from .core.files import load, save  # noqa: E402
from .core.registry import method_class, method_names  # noqa: E402
from .core.tasks import current_task_ids, task_ids  # noqa: E402


def export(model, directory, *, format: str = "peft", name: str = "default"):
    """Write adapter ``name`` in another library's format (``"peft"``: HF PEFT / vLLM LoRA)."""
    if format != "peft":
        raise ConfigError(f"unknown export format {format!r}; supported: 'peft'")
    from .core.peft_format import export_peft

    return export_peft(model, directory, name=name)


def _config_classes() -> dict[str, type]:
    return {method_class(n).__name__: method_class(n) for n in method_names()}


def __getattr__(attr: str):
    classes = _config_classes()
    if attr in classes:
        return classes[attr]
    raise AttributeError(f"module 'peftlab' has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_config_classes()))


__all__ = [
    "AdapterFileError", "ConfigError", "MergeError", "PeftlabError", "TargetError", "UnknownMethodError",
    "active", "adaptation", "adapt", "adapter_parameters", "adapters", "current_task_ids", "delete", "disabled",
    "export", "load", "merge", "methods", "quant", "regularization", "save", "task_ids", "trainable_parameter_count",
    "use",
]
