"""DiffoRA: a differential adaptation matrix (DAM) decides which modules get LoRA.

Jiang, Wang, Yuan 2025, arXiv 2502.08905 ("DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via
Differential Low-Rank Matrix Adaptation"). No official code was found (searched GitHub code,
documentation and web corpora), and only the abstract of the paper could be read here, so the
mechanism below is peftlab's reading of it; every choice the abstract does not fix is marked
[peftlab].

The DAM Γ has one entry per adaptable module (a layer × module-kind matrix; here one entry per
adapted site). Γ is binary in the final model: a module either gets its LoRA update or not. To learn
it, Γ is *continuously relaxed* and trained, then *discretized*; the LoRA weights learned during the
search are kept for the selected modules (*weight sharing*: no re-initialisation after the search)::

    search phase    y = W0 x + σ(α_m) · s · B_m A_m x        α_m: trainable DAM logit of module m
    discretization  Γ_m = 1 for the top-k modules by σ(α_m), k = round(select_ratio · #modules), else 0
    fine-tuning     y = W0 x + Γ_m · s · B_m A_m x           α no longer used; unselected LoRAs idle

Phase boundaries the user controls:

* ``search_steps`` (default None → ``ceil(search_fraction · total_steps)``, search_fraction 0.1):
  the trainer's ``on_step`` hook discretizes at the first optimizer step with
  ``step.step >= boundary``; ``search_fraction=1.0`` with no ``search_steps`` never discretizes on
  its own.
* :func:`select_modules` discretizes by hand at any time (e.g. after a separate search run on
  held-out data, the paper's bi-level setting: put :func:`dam_parameters` in their own optimizer
  fed with validation batches and the remaining parameters in another).
* ``select_ratio`` is the module budget (fraction of the adapted sites that keep LoRA).

[peftlab] choices: sigmoid relaxation with α = 0 at init (σ = 0.5: neutral); inside the trainer the
DAM trains jointly with the LoRA weights on the training batches (first-order, single-level; the
bi-level split needs held-out data the hook protocol does not carry); one global top-k over all
sites (ties broken by site order); r 8, alpha 16, dropout 0.05 as peftlab's LoRA; targets: all seven
projections (the search space).

The selection state (``searching``, ``selected``) is learned, so it is kept in persistent buffers
and saved. Parameters cannot change shape during training, so unselected modules keep their
(now idle, zero-gradient) LoRA factors and their DAM entry; after the search their forward skips the
LoRA product (the phase flags are read from the device only after they change, so the forward does
not synchronise with the GPU on every call). Compiled code cannot branch on the flags without breaking
the graph at every adapter: there the gate is arithmetic on them, and unselected modules compute their
zero update and get zero gradients.

Trainable parameters per adapted layer: r·(in + out) + 1 (LoRA factors + one DAM logit); after
discretization only the selected modules' factors still receive gradients. Mergeable: ΔW = g·s·B A
with g = σ(α) while searching, Γ afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, TrainingStep, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import generator


class DiffoRAAdapter(LayerAdapter):
    def __init__(self, config: DiffoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.scale = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(config.r, fan_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r, device=site.device))
        self.dam_logit = nn.Parameter(torch.zeros((), device=site.device))
        self.register_buffer("searching", torch.ones((), dtype=torch.bool, device=site.device))
        self.register_buffer("selected", torch.zeros((), dtype=torch.bool, device=site.device))
        if site.restoring:
            return
        gen = generator(config.seed, site.path)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5), as LoRA
        with torch.no_grad():
            self.lora_A.copy_(torch.empty(config.r, fan_in).uniform_(-bound, bound, generator=gen))

    def gate(self) -> torch.Tensor:
        """σ(α) while searching, the binary DAM entry afterwards. Without a branch on the flags: code
        torch.compile traces would break its graph there at every adapter, and merging need not sync."""
        return torch.where(self.searching, torch.sigmoid(self.dam_logit), self.selected.to(self.dam_logit.dtype))

    def phase(self) -> tuple[bool, bool]:
        """(searching, selected), read from the device once per change of the buffers (their version
        counters move on every in-place write: discretize, load) instead of on every call."""
        flags = (self.searching, self.selected)
        if any(f.is_inference() for f in flags):
            return bool(flags[0]), bool(flags[1])
        key = tuple((id(f), f.data_ptr(), f._version) for f in flags)
        cached = self.__dict__.get("_phase")
        if cached is None or cached[0] != key:
            cached = (key, (bool(flags[0]), bool(flags[1])))
            self.__dict__["_phase"] = cached
        return cached[1]

    def forward(self, layer, x, base):
        """base(x) + g·s·B A dropout(x): g·s rides on B's cast, the sum on the B-GEMM (addmm), as in LoRA."""
        out = base(x)
        if torch.compiler.is_compiling():
            gain = self.gate() * self.scale  # unselected modules compute their zero update
        else:
            searching, selected = self.phase()
            if not searching and not selected:
                return out
            gain = torch.sigmoid(self.dam_logit) * self.scale if searching else self.scale  # Γ = 1 when selected
        xa = linear(self.dropout(x).reshape(-1, self.lora_A.shape[1]), self.lora_A)
        flat = torch.addmm(out.reshape(xa.shape[0], -1), xa, (self.lora_B * gain).to(xa.dtype).T)
        return flat.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        return (self.gate().float() * self.scale) * (self.lora_B.float() @ self.lora_A.float())


@register
@dataclass
class DiffoRA(LayerMethod):
    name: ClassVar[str] = "diffora"
    family: ClassVar[str] = "rank & structure"
    paper: ClassVar[str] = "DiffoRA, arXiv 2502.08905"
    formula: ClassVar[str] = "r·(in + out) + 1"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False

    r: int = config_field(8, "LoRA rank of every candidate module")
    alpha: float = config_field(16.0, "scale numerator: s = alpha / r")
    dropout: float = config_field(0.05, "dropout on the adapter's input")
    select_ratio: float = config_field(0.5, "fraction of the adapted modules the DAM keeps (the budget)")
    search_fraction: float = config_field(0.1, "search phase length as a fraction of total_steps")
    search_steps: int | None = config_field(None, "search phase length in optimizer steps (overrides search_fraction)")
    seed: int = config_field(0, "seed of the LoRA initialisation")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(0.0 < self.select_ratio <= 1.0, self.name, f"select_ratio must be in (0, 1], got {self.select_ratio}")
        check(0.0 <= self.search_fraction <= 1.0, self.name,
              f"search_fraction must be in [0, 1], got {self.search_fraction}")
        check(self.search_steps is None or (isinstance(self.search_steps, int) and self.search_steps >= 0),
              self.name, f"search_steps must be None or a non-negative integer, got {self.search_steps!r}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return DiffoRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features) + 1

    def search_boundary(self, total_steps: int) -> int | None:
        """Optimizer steps of search before discretization (None: never on its own)."""
        if self.search_steps is not None:
            return self.search_steps
        if self.search_fraction >= 1.0:
            return None
        return math.ceil(self.search_fraction * total_steps)

    def budget(self, sites: int) -> int:
        return min(sites, max(1, round(self.select_ratio * sites)))

    def on_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> None:
        boundary = self.search_boundary(step.total_steps)
        if boundary is None or step.step < boundary:
            return
        if any(a.phase()[0] for a in adapters.values()):  # cached: no host read per layer and step
            discretize(adapters, self.budget(len(adapters)))


def discretize(adapters: dict[str, nn.Module], k: int) -> list[str]:
    """Keep LoRA on the k modules with the largest DAM weight σ(α); end the search. Returns their paths."""
    paths = list(adapters)
    if not 0 < k <= len(paths):
        raise ConfigError(f"diffora: the budget must keep between 1 and {len(paths)} modules, got {k}")
    weights = torch.stack([torch.sigmoid(adapters[p].dam_logit.detach().float().cpu()) for p in paths])
    order = torch.argsort(-weights, stable=True)  # ties: site order
    keep = {paths[i] for i in order[:k].tolist()}
    with torch.no_grad():
        for path, adapter in adapters.items():
            adapter.selected.fill_(path in keep)
            adapter.searching.fill_(False)
    return [p for p in paths if p in keep]


def select_modules(model: nn.Module, name: str = "default", k: int | None = None) -> list[str]:
    """Discretize adapter ``name`` now (k modules; default: the config's budget)."""
    from peftlab.core import api

    config = api.adapters(model).get(name)
    if not isinstance(config, DiffoRA):
        raise ConfigError(f"adapter {name!r} is not a diffora adapter")
    adapters = api.attached_adapters(model, name)
    return discretize(adapters, config.budget(len(adapters)) if k is None else k)


def dam_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The DAM logits of adapter ``name`` (for a separate, e.g. validation-driven, optimizer)."""
    from peftlab.core import api

    return [a.dam_logit for a in api.attached_adapters(model, name).values()]
