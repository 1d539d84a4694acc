"""Hydra: a parallel and a sequential low-rank branch on one linear layer.

Kim, Yang, Kim, Hong, Park 2023, arXiv 2309.06922. Official code followed: extremebird/Hydra,
commit 4138457859666d49b9ca9e45473d8570586670bb (``nlu/src/transformers/models/adapter.py`` and
``roberta/modeling_roberta.py`` for the language setting, ``vtab1k/hydra.py`` for the ViT setting
and its re-parameterisation)::

              ┌──► dropout ─► A_p ─► B_p ──────────────┐          parallel: learns new features
    x ────────┤                                        ▼
              └──► W0 x + b ──┬──────────────────────► (+) ──► y
                              └─► dropout ─► A_s ─► B_s ┘          sequential: recombines
                                                                   the pre-trained features

    y = W0 x + b  +  s · B_p A_p x  +  s · B_s A_s (W0 x + b)

A_p: r_p x in, B_p: out x r_p, A_s: r_s x out, B_s: out x r_s. The sequential branch reads the
layer's own output (bias included, as the official FFN code feeds ``dense(h)`` to it), so it learns
a linear combination of the pre-trained features. Both branches are linear, so Hydra merges:

    W <- W0 + s (B_p A_p + B_s A_s W0)          b <- b + s B_s A_s b

(``merge_into`` also updates the bias). A's start Kaiming-uniform (a = √5), B's at zero (the NLU
``Hydra`` module), so the model is unchanged at init.

Defaults: parallel_r 4, sequential_r 8 (``nlu/hydra_*.sh``: ``--hydra_par_r 4 --hydra_seq_r 8``),
scale 1 and no dropout (the NLU module has neither), no adapter biases (the NLU module has none; the
ViT module has biases), targets o and down: the ViT ``hydra_both`` setting puts Hydra on the
attention output projection and the second FFN layer; the NLU code on the FFN output only
(``targets=["down_proj"]`` reproduces it).

Trainable parameters per adapted layer: r_p·(in + out) + 2·r_s·out.

Noticed in the official code, not copied: in ``modeling_roberta.py`` the flag is set as
``self.apply_hyra = True`` (typo), so ``self.apply_hydra`` stays False and the NLU forward never
runs the Hydra branches, and it reads ``config.hyrda_par_r``; in ``vtab1k/hydra.py``
``set_hydraWeight`` re-parameterises the attention projection with the FFN's ``fc2`` weight. Here the
branches always run and merge uses each layer's own W0 and b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core import layers
from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import generator


def _kaiming_rows(rows: int, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5)
    return torch.empty(rows, fan_in).uniform_(-bound, bound, generator=gen)


class HydraAdapter(LayerAdapter):
    def __init__(self, config: Hydra, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dev = site.device
        self.parallel_A = nn.Parameter(torch.zeros(config.parallel_r, fan_in, device=dev))
        self.parallel_B = nn.Parameter(torch.zeros(fan_out, config.parallel_r, device=dev))
        self.sequential_A = nn.Parameter(torch.zeros(config.sequential_r, fan_out, device=dev))
        self.sequential_B = nn.Parameter(torch.zeros(fan_out, config.sequential_r, device=dev))
        if site.restoring:
            return
        gen = generator(config.seed, site.path)
        with torch.no_grad():
            self.parallel_A.copy_(_kaiming_rows(config.parallel_r, fan_in, gen))
            self.sequential_A.copy_(_kaiming_rows(config.sequential_r, fan_out, gen))

    def parallel(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(self.dropout(x), self.parallel_A), self.parallel_B) * self.scale

    def sequential(self, h: torch.Tensor) -> torch.Tensor:
        return linear(linear(self.dropout(h), self.sequential_A), self.sequential_B) * self.scale

    def forward(self, layer, x, base):
        out = base(x)
        return out + self.parallel(x) + self.sequential(out)

    def _mix(self) -> tuple[torch.Tensor, torch.Tensor]:
        par = self.parallel_B.float() @ self.parallel_A.float()
        seq = self.sequential_B.float() @ self.sequential_A.float()
        return self.scale * par, self.scale * seq

    def delta_weight(self, layer) -> torch.Tensor:
        par, seq = self._mix()
        weight = layers.weight_matrix(layer).detach().float()
        return par + seq @ weight

    def merge_into(self, layer: nn.Module) -> None:
        par, seq = self._mix()
        weight = layers.weight_matrix(layer).detach().float()
        layers.set_weight_matrix(layer, weight + par + seq @ weight.to(seq.device))
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.add_((seq @ bias.detach().float().to(seq.device)).to(bias.dtype))


@register
@dataclass
class Hydra(LayerMethod):
    name: ClassVar[str] = "hydra"
    family: ClassVar[str] = "rank & structure"
    paper: ClassVar[str] = "Hydra, arXiv 2309.06922"
    formula: ClassVar[str] = "r_p·(in + out) + 2·r_s·out"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False
    default_roles: ClassVar[tuple[str, ...]] = ("o", "down")

    parallel_r: int = config_field(4, "rank of the parallel branch B_p A_p x")
    sequential_r: int = config_field(8, "rank of the sequential branch B_s A_s (W0 x + b)")
    scale: float = config_field(1.0, "scale s of both branches")
    dropout: float = config_field(0.0, "dropout on each branch's input")
    seed: int = config_field(0, "seed of the A initialisation")

    def validate(self) -> None:
        check_positive_ints(self, "parallel_r", "sequential_r")
        check(self.scale != 0, self.name, "scale must be non-zero")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")

    def build(self, site: Site) -> LayerAdapter:
        fan_in, fan_out = site.features
        if self.parallel_r > min(fan_in, fan_out) or self.sequential_r > fan_out:
            raise ConfigError(f"{self.name}: parallel_r={self.parallel_r} / sequential_r={self.sequential_r} exceed "
                              f"the layer's sizes (in {fan_in}, out {fan_out}) at {site.path}")
        return HydraAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.parallel_r * (in_features + out_features) + 2 * self.sequential_r * out_features
