"""What a method is: a config dataclass that builds adapter modules.

Two attachment kinds share one registry:

* ``LayerMethod`` builds one ``LayerAdapter`` per targeted module (linear, norm, ...). The adapter
  computes the module's new output from its input and the inner computation ``base``::

        y = adapter(layer, x, base)      # e.g. LoRA: base(x) + s * B A x

  Stacked adapters on one layer nest: the outer one's ``base`` is the inner one.
* ``ModelMethod`` builds one ``ModelAdapter`` for the whole model (prompt and prefix tuning), which
  rewrites the model's forward inputs and outputs through hooks.

Invariant kept by every adapter: its ``nn.Parameter``s are exactly what trains; frozen tensors are
buffers, persistent when they cannot be recomputed from the base weights and the config.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from . import layers
from .errors import ConfigError, MergeError
from .targets import ROLES


@dataclass(frozen=True)
class TrainingStep:
    """What the trainer tells training hooks about the optimizer step in progress."""

    step: int  # optimizer steps completed before this one
    total_steps: int
    lr: float  # learning rate of this step
    peak_lr: float  # the configured learning rate, before warm-up and decay
    accumulation: int = 1  # micro-batches per optimizer step


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses are dataclasses registered by name.

    Training hooks receive ``adapters``, the adapter modules of one attachment keyed by host path,
    so a method can act across layers (a global rank budget, a mean over layers). The defaults
    delegate to same-named methods of each adapter when it has them.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""  # trainable parameters per adapted layer (or in total), human readable
    mergeable: ClassVar[bool] = False
    derives_from_weights: ClassVar[bool] = False  # adapter state is computed from the base weights
    identity_at_init: ClassVar[bool] = True  # the adapted model computes the base function at init

    targets: str | list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for out-of-range options. Subclasses extend it."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in cls.option_fields()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; "
                              f"options are {', '.join(sorted(known))}")
        return cls(**_coerce(cls, options))

    def replace(self, **options: Any) -> MethodConfig:
        merged = {**self.options(), **options}
        return type(self).from_options(merged)

    def regularization(self, adapters: dict[str, nn.Module]) -> torch.Tensor | None:
        """A loss term added to every micro-batch's loss (None: none)."""
        terms = [t for a in adapters.values() if (t := a.regularization()) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def on_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> None:
        """Called before the first micro-batch of every optimizer step (schedules, re-selection)."""
        for adapter in adapters.values():
            if hasattr(adapter, "on_step"):
                adapter.on_step(step)

    def before_optimizer_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> None:
        """Called once gradients are final (accumulated, clipped), right before ``optimizer.step()``."""
        for adapter in adapters.values():
            if hasattr(adapter, "before_optimizer_step"):
                adapter.before_optimizer_step(step)


def _coerce(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """Turn list-valued JSON/YAML input into tuples where a field is declared as a tuple."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in options.items():
        hint = str(hints.get(key, ""))
        out[key] = tuple(value) if isinstance(value, list) and hint.startswith("tuple") else value
    return out


def check(condition: bool, method: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{method}: {message}")


def check_positive_ints(config: MethodConfig, *field_names: str) -> None:
    """ConfigError unless each named option of ``config`` is a positive integer (a bool is not one)."""
    for field_name in field_names:
        value = getattr(config, field_name)
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0, config.name,
              f"{field_name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Layer methods


@dataclass
class Site:
    """A module an adapter attaches to, as the method's builder sees it."""

    path: str
    module: nn.Module
    role: str | None = None  # q, k, v, o, gate, up or down in a known architecture
    statistic: Any = None  # calibration statistic, for data-dependent initialisers
    restoring: bool = False  # True when built to receive saved state: skip costly or random init

    @property
    def features(self) -> tuple[int, int]:
        return layers.features(self.module)

    @property
    def in_features(self) -> int:
        return self.features[0]

    @property
    def out_features(self) -> int:
        return self.features[1]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def weight(self) -> torch.Tensor:
        """The frozen weight as an (out, in) fp32 matrix (a copy)."""
        return layers.weight_matrix(self.module).detach().float().clone()


class LayerAdapter(nn.Module):
    """One adapter on one layer."""

    # False when the adapter cannot share its layer with another active adapter: its forward reads
    # the layer's weight directly instead of calling ``base``, or it redefines the base (KaSA).
    stackable: ClassVar[bool] = True

    def forward(self, layer: nn.Module, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]):
        raise NotImplementedError

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """ΔW as an (out, in) fp32 matrix, for methods whose merge is W <- W + ΔW."""
        raise MergeError(f"{type(self).__name__} cannot be merged into the base weights")

    def merge_into(self, layer: nn.Module) -> None:
        """Fold this adapter into ``layer``'s parameters (in place)."""
        weight = layers.weight_matrix(layer).detach().float()
        layers.set_weight_matrix(layer, weight + self.delta_weight(layer).to(weight.device))

    def regularization(self) -> torch.Tensor | None:
        """A term the trainer adds to the loss each micro-batch (None: no term)."""
        return None


class LayerMethod(MethodConfig):
    """A method that attaches one LayerAdapter per targeted module."""

    kind: ClassVar[str] = "linear"  # what it adapts, for messages
    default_roles: ClassVar[Sequence[str]] = ROLES
    needs_calibration: ClassVar[bool] = False

    def accepts(self, module: nn.Module) -> bool:
        return layers.is_linear(module)

    def default_targets(self, model: nn.Module) -> str | list[str] | None:
        """Targets used when the user gives none; None means ``default_roles``."""
        return None

    def build(self, site: Site) -> LayerAdapter:
        raise NotImplementedError

    def finish_build(self, adapters: dict[str, LayerAdapter], restoring: bool) -> None:
        """Called once every site of one attachment is built, before any is attached: wire state across
        layers (shared pools, global budgets). May raise ConfigError; the model is still untouched."""

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int | None:
        """Trainable parameters added to one (in -> out) layer by the documented formula (None: the
        count depends on the weights)."""
        raise NotImplementedError

    def attachment_count(self, sites: Sequence[tuple[nn.Module, str | None]]) -> int | None:
        """Trainable parameters of one attachment on these (module, role) sites (modules may live on the
        meta device): the per-layer formula summed. Methods whose parameters are shared across layers
        (hypernetworks), or whose count depends on more than the widths, override it."""
        counts = [self.trainable_count(*layers.features(module), role) for module, role in sites]
        return None if None in counts else sum(counts)

    def new_statistic(self, site: Site) -> Any:
        """A calibration accumulator with ``update(x)`` for this site (data-dependent methods)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Model methods


class ModelAdapter(nn.Module):
    """An adapter of the whole model: it edits the model's call arguments and outputs.

    ``before`` receives the forward kwargs (positional inputs already folded in) and returns new
    kwargs plus a value handed to ``after``.
    """

    def before(self, model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        raise NotImplementedError

    def after(self, model: nn.Module, output: Any, state: Any) -> Any:
        return output

    def regularization(self) -> torch.Tensor | None:
        return None


class ModelMethod(MethodConfig):
    """A method that attaches one ModelAdapter to the model."""

    kind: ClassVar[str] = "model"

    def check_model(self, model: nn.Module) -> None:
        """Raise TargetError when the model cannot host this method."""

    def build(self, model: nn.Module, restoring: bool = False) -> ModelAdapter:
        raise NotImplementedError

    def trainable_count_for(self, model_config: Any) -> int:
        raise NotImplementedError


def config_field(default: Any, doc: str) -> Any:
    """A dataclass field carrying a one-line description (shown by ``peftlab methods``)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})
