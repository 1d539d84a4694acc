"""PaCA: Partial Connection Adaptation (Woo et al., ICLR 2025, arXiv 2503.01905).

PaCA trains no adapter layer: it fine-tunes r randomly chosen *columns* of each adapted weight
W (out x in), i.e. every connection leaving r of the layer's input features, and nothing else.
Since only those columns change, only the r selected input features x[..., cols] have to be kept
for the backward pass (PaCA's activation-memory saving).

peftlab never writes a base weight while attaching or training, so the trained columns are held as
a delta on the frozen W0 (zero at init, so the model starts as the base model)::

    y = W0 x + b + s · Δ x[..., cols]          Δ: out x r, starts at 0;  cols: r distinct inputs
    merge:  W[:, cols] <- W[:, cols] + s · Δ    (every other column stays bit-identical)

s = alpha / r. The official code (WooSunghyeon/paca, commit 20570b3e, ``peft/src/peft/tuners/paca/
layer.py``) keeps a parameter P, initialised to W0[:, cols] / s, and writes s·P into those columns
of the weight during training. With Δ = P - P0 both parametrisations compute the same function
and receive the same gradient (∂L/∂P = ∂L/∂Δ = s · gᵀ x[..., cols]), so SGD and Adam take
identical steps.

Defaults: r = 8, alpha = 16 on all seven projections (q k v o gate up down), the usage shown in the
official README; the code's config class defaults to alpha = 8, and the paper's LLaMA-2-7B MMLU
script uses r = 16, alpha = 64 (pass them explicitly to reproduce it).

Trainable parameters per adapted (in -> out) layer: r · out. On LLaMA-2-7B, r = 8 on all seven
projections: 32 x (4·8·4096 + 2·8·11008 + 8·4096) = 10,878,976 (21,757,952 at the MMLU r = 16).

Which columns: the official code draws ``torch.randperm(in)[:r]`` from the global RNG and keeps the
indices in a *persistent* buffer. peftlab does the same: the indices are saved with the adapter
(``columns``, r int64 per layer, negligible next to the r·out parameters), so a saved adapter does
not depend on torch's RNG stream, which is not guaranteed across versions or between CPU and CUDA
generators. ``seed`` (an int) makes the choice reproducible without touching the global RNG: each
layer then uses a local CPU ``torch.Generator`` seeded from (seed, CRC32 of the module path), so the
choice does not depend on which other layers are adapted or on the order they are built in. The
selected indices are sorted (the order of the columns is immaterial; sorted gathers are cheaper).

Deviations:
* PaCA's speed-up comes from running one GEMM with the partially updated weight; peftlab keeps W0
  frozen, so it runs the base layer plus one r-wide GEMM. The function, the gradients and the
  activation saving (only x[..., cols] is kept for Δ's gradient) are those of PaCA; the speed-up is
  not reproduced.
* Decoupled weight decay acts on Δ, i.e. pulls the columns towards W0 instead of towards 0.
* The official layer only handles 3-D activations (``activation[:, :, indices]``); peftlab gathers on
  the last dimension of any shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import generator


def choose_columns(fan_in: int, r: int, seed: int | None, path: str) -> torch.Tensor:
    """r distinct input indices out of ``fan_in``, sorted (int64, on the CPU)."""
    if seed is None:
        picked = torch.randperm(fan_in)[:r]  # the global RNG, as the official code does
    else:
        picked = torch.randperm(fan_in, generator=generator(seed, path))[:r]
    return picked.sort().values


class PaCAAdapter(LayerAdapter):
    def __init__(self, config: PaCA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.scale = config.scale
        self.delta = nn.Parameter(torch.zeros(fan_out, config.r, device=site.device))
        # Persistent: the random choice is saved, not regenerated (see the module docstring).
        self.register_buffer("columns", torch.zeros(config.r, dtype=torch.long, device=site.device))
        if site.restoring:
            return
        self.columns.copy_(choose_columns(fan_in, config.r, config.seed, site.path))

    def forward(self, layer, x, base):
        return base(x) + linear(x.index_select(-1, self.columns), self.delta) * self.scale

    def delta_weight(self, layer) -> torch.Tensor:
        fan_out, fan_in = weight_matrix(layer).shape
        delta = torch.zeros(fan_out, fan_in, device=self.delta.device)
        delta[:, self.columns] = self.scale * self.delta.float()
        return delta

    def merge_into(self, layer) -> None:
        """Write only the chosen columns (the rest of W is not even rounded)."""
        with torch.no_grad():
            matrix = weight_matrix(layer)  # (out, in); a transposed view for GPT-2's Conv1D
            columns = self.columns.to(matrix.device)
            updated = matrix[:, columns].float() + self.scale * self.delta.float().to(matrix.device)
            matrix[:, columns] = updated.to(matrix.dtype)


@register
@dataclass
class PaCA(LayerMethod):
    name: ClassVar[str] = "paca"
    family: ClassVar[str] = "selective"
    paper: ClassVar[str] = "PaCA: Partial Connection Adaptation, arXiv 2503.01905"
    formula: ClassVar[str] = "r·out"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True

    r: int = config_field(8, "number of input columns of W trained per layer")
    alpha: float = config_field(16.0, "scale numerator: the columns move by (alpha / r)·Δ")
    seed: int | None = config_field(None, "seed of the column choice (None: torch's global RNG, as the paper)")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0, self.name,
              f"alpha must be a positive number, got {self.alpha!r}")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                    and self.seed >= 0), self.name,
              f"seed must be None or a non-negative integer, got {self.seed!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def build(self, site: Site) -> LayerAdapter:
        if self.r > site.in_features:
            raise ConfigError(f"{self.name}: r={self.r} exceeds the {site.in_features} input features of {site.path}")
        return PaCAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * out_features
