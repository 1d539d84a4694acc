"""Bottleneck adapters: series (Houlsby et al. 2019, arXiv 1902.00751) and parallel (He et al. 2022,
arXiv 2110.04366), placed as LLM-Adapters places them.

    series, before a linear ("input"):   y = W (x + s·up(act(down(x))))
    series, after a linear ("output"):   h = W x;  y = h + s·up(act(down(h)))
    parallel, beside a linear:           y = W x + s·up(act(down(x)))

down: size x d, up: d' x size, no biases (LLM-Adapters). s is a constant (1.0 by default; "scaled
parallel" uses another value) or, with ``scaling="learned"``, one trainable scalar starting at 1.
Defaults follow LLM-Adapters: bottleneck 256, tanh, dropout 0. LLM-Adapters initialises both
projections N(0, 0.02) ("bert"), which changes the model at init; peftlab's default "zeros" (down
Kaiming-uniform, up 0: identity at init, as in both papers and LLM-Adapters' "mam_adapter") keeps
the base output, and ``init="bert"`` reproduces the original. The adapter computes in the
activations' dtype (the original upcasts to fp32 in every layer).

Series placements: ``llm-adapters`` (its default: before gate and up, after down), ``houlsby``
(after the attention output and after the MLP: o and down), ``pfeiffer`` (AdapterP: after the MLP
only). Parallel placements: ``attention`` (q, k, v: LLM-Adapters' default) or ``mlp`` (up and down:
its math runs). With explicit ``targets``, gate/up projections take the adapter on their input and
everything else on its output, unless ``position`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

SERIES_PLACEMENTS = {"llm-adapters": ("gate", "up", "down"), "houlsby": ("o", "down"), "pfeiffer": ("down",)}
PARALLEL_PLACEMENTS = {"attention": ("q", "k", "v"), "mlp": ("up", "down")}
INPUT_ROLES = ("gate", "up")


class Bottleneck(nn.Module):
    """s·up(act(down(dropout(h)))) for h of width ``width_in``, output width ``width_out``."""

    def __init__(self, width_in: int, width_out: int, config: _BottleneckConfig, device: torch.device):
        super().__init__()
        self.down = nn.Parameter(torch.empty(config.bottleneck_size, width_in, device=device))
        self.up = nn.Parameter(torch.empty(width_out, config.bottleneck_size, device=device))
        self.act = ACT2FN[config.non_linearity]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        learned = config.scaling == "learned"
        self.learned_scale = nn.Parameter(torch.ones(1, device=device)) if learned else None
        self.scale = 1.0 if learned else float(config.scaling)
        with torch.no_grad():
            if config.init == "bert":
                nn.init.normal_(self.down, std=0.02)
                nn.init.normal_(self.up, std=0.02)
            else:
                nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
                nn.init.zeros_(self.up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = linear(self.act(linear(self.dropout(h), self.down)), self.up)
        if self.learned_scale is not None:
            return out * self.learned_scale.to(out.dtype)
        return out * self.scale


class SeriesAdapter(LayerAdapter):
    def __init__(self, config: Series, site: Site, on_input: bool):
        super().__init__()
        width = site.in_features if on_input else site.out_features
        self.on_input = on_input
        self.block = Bottleneck(width, width, config, site.device)

    def forward(self, layer, x, base):
        if self.on_input:
            return base(x + self.block(x))
        h = base(x)
        return h + self.block(h)


class ParallelAdapter(LayerAdapter):
    def __init__(self, config: Parallel, site: Site):
        super().__init__()
        self.block = Bottleneck(site.in_features, site.out_features, config, site.device)

    def forward(self, layer, x, base):
        return base(x) + self.block(x)


@dataclass
class _BottleneckConfig(LayerMethod):
    family: ClassVar[str] = "bottleneck adapter"
    mergeable: ClassVar[bool] = False

    bottleneck_size: int = config_field(256, "bottleneck width")
    non_linearity: str = config_field("tanh", "activation (any transformers ACT2FN name)")
    dropout: float = config_field(0.0, "dropout on the adapter input")
    scaling: float | str = config_field(1.0, "output scale s, or 'learned' (one trainable scalar, init 1)")
    init: str = config_field("zeros", "zeros (down Kaiming, up 0: identity at init) | bert (both N(0, 0.02))")

    @property
    def identity_at_init(self) -> bool:
        return self.init == "zeros"

    def validate(self) -> None:
        check_positive_ints(self, "bottleneck_size")
        check(self.non_linearity in ACT2FN, self.name, f"unknown non_linearity {self.non_linearity!r}")
        check(0.0 <= self.dropout < 1.0, self.name, "dropout must be in [0, 1)")
        check(self.scaling == "learned" or isinstance(self.scaling, (int, float)), self.name,
              f"scaling must be a number or 'learned', got {self.scaling!r}")
        check(self.init in ("zeros", "bert"), self.name, f"init must be zeros or bert, got {self.init!r}")

    def _scale_params(self) -> int:
        return 1 if self.scaling == "learned" else 0


@register
@dataclass
class Series(_BottleneckConfig):
    name: ClassVar[str] = "series"
    paper: ClassVar[str] = "Houlsby adapters, arXiv 1902.00751 (LLM-Adapters' 'bottleneck')"
    formula: ClassVar[str] = "2·size·d (+1 if learned), d = in (before gate/up) or out (after)"

    placement: str = config_field("llm-adapters", "llm-adapters (gate, up in; down out) | houlsby (o, down) | "
                                  "pfeiffer (down)")
    position: str = config_field("auto", "auto (gate/up: input, else output) | input | output")

    @property
    def default_roles(self) -> tuple[str, ...]:
        return SERIES_PLACEMENTS[self.placement]

    def validate(self) -> None:
        super().validate()
        check(self.placement in SERIES_PLACEMENTS, self.name, f"placement must be one of {list(SERIES_PLACEMENTS)}")
        check(self.position in ("auto", "input", "output"), self.name, "position must be auto, input or output")

    def on_input(self, role: str | None) -> bool:
        return self.position == "input" or (self.position == "auto" and role in INPUT_ROLES)

    def build(self, site: Site) -> LayerAdapter:
        return SeriesAdapter(self, site, self.on_input(site.role))

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        width = in_features if self.on_input(role) else out_features
        return 2 * self.bottleneck_size * width + self._scale_params()


@register
@dataclass
class Parallel(_BottleneckConfig):
    name: ClassVar[str] = "parallel"
    paper: ClassVar[str] = "Parallel adapters, arXiv 2110.04366"
    formula: ClassVar[str] = "size·(in + out) (+1 if learned)"

    placement: str = config_field("attention", "attention (q, k, v: LLM-Adapters' default) | mlp (up, down)")

    @property
    def default_roles(self) -> tuple[str, ...]:
        return PARALLEL_PLACEMENTS[self.placement]

    def validate(self) -> None:
        super().validate()
        check(self.placement in PARALLEL_PLACEMENTS, self.name, f"placement must be one of {list(PARALLEL_PLACEMENTS)}")

    def build(self, site: Site) -> LayerAdapter:
        return ParallelAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.bottleneck_size * (in_features + out_features) + self._scale_params()
