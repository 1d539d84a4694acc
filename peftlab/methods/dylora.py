"""DyLoRA: one LoRA trained for a whole range of ranks at once (nested ranks).

Valipour, Rezagholizadeh, Kobyzev, Ghodsi 2022, arXiv 2210.07558. Official code followed:
huawei-noah/Efficient-NLP, folder DyLoRA (``loralib/DyLoRA.py``, ``loralib/layers.py`` and the rank
callback in ``examples/NLU/examples/text-classification/run_glue.py``), commit
bb44348bc897779be9357cef8dfd8e397d17ed49.

The factors are ordered: rank b uses the first b rows of A and the first b columns of B::

    A = [a_1; a_2; ...; a_r]   (r x in)        B = [b_1 b_2 ... b_r]   (out x r)

    ΔW_b = (alpha / b) · B[:, :b] A[:b]        for any b in 1..r

    x ──► W0 ────────────────────────────────┐
    │                                        ▼
    └─► dropout ─► A[:b] ─► B[:, :b] ─► (× alpha/b) ─► (+) ─► y

so a trained DyLoRA truncated to rank k *is* a rank-k LoRA whose factors are the leading k
rows/columns, with LoRA's usual scale alpha / k. (The official code multiplies each truncated factor
by sqrt(r / b) on top of alpha / r; the product is the same alpha / b.)

Training: before every optimizer step one rank b is drawn uniformly from {min_rank, ..., r} and used
by every adapted layer (the official callback draws ``randint(0, r)`` as an index, i.e. ranks 1..r,
and broadcasts it to the model). With ``update="last"`` (the official default, ``frozen=True``) only
the b-th row of A and the b-th column of B receive gradients; rows/columns < b are detached, so the
leading ranks are not disturbed by larger ones. ``update="all"`` trains all b leading rows/columns
(the paper's non-frozen ablation). Sampling runs in ``on_step`` with a local generator seeded from
``seed`` and the step number, so it is reproducible and resumable without saving generator state.
In training the drawn rank is a tensor and the factors keep all r rows/columns, zeroed beyond b: the same
products (zeros add nothing), but one shape for every draw, so compiled blocks compile once.

Inference (eval mode, ``delta_weight``, merge) uses ``inference_rank`` (default r). Change it after
training with :func:`set_inference_rank`, which also updates the config so ``save`` records it.
In train mode without the trainer's ``on_step`` (a plain loop), the full rank r is used, in the
chosen update mode.

Defaults: r 8, alpha 16, dropout 0, targets q and v: the official GLUE scripts
(``roberta_base_*.sh``: ``--lora_r 8 --lora_alpha 16``; RoBERTa attaches to query and value only).
Init as LoRA: A Kaiming-uniform (a = √5), B zero, so the model is unchanged at init.

Trainable parameters per adapted layer: r·(in + out), as LoRA at rank r.

Deviations: the official callback reads the global torch RNG; here a local generator. The official
eval loop sets the rank explicitly and otherwise would evaluate with the last sampled training rank;
here eval uses ``inference_rank``. [peftlab] ``min_rank`` (the paper's lower bound of the rank range;
the code always uses 1) and ``seed`` are extra options.
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

UPDATES = ("last", "all")


class DyLoRAAdapter(LayerAdapter):
    def __init__(self, config: DyLoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.max_rank = config.r
        self.alpha = config.alpha
        self.update_all = config.update == "all"
        self.register_buffer("positions", torch.arange(config.r, device=site.device), persistent=False)
        self.register_buffer("sampled_rank", torch.tensor(config.r, device=site.device), persistent=False)
        self.train_rank = config.r  # set by the config's on_step
        self.inference_rank = config.rank_for_inference
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(config.r, fan_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r, device=site.device))
        if site.restoring:
            return
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) on fan_in, as LoRA
        init = torch.empty(config.r, fan_in).uniform_(-bound, bound, generator=generator(config.seed, site.path))
        with torch.no_grad():
            self.lora_A.copy_(init)

    @property
    def train_rank(self) -> int:
        return int(self.sampled_rank)

    @train_rank.setter
    def train_rank(self, rank: int) -> None:
        with torch.no_grad():
            self.sampled_rank.fill_(rank)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The leading ``rank`` rows of A and columns of B."""
        return self.lora_A[:rank], self.lora_B[:, :rank]

    def training_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All r rows of A and columns of B, zero beyond the sampled rank b and, in 'last' mode, detached
        before it. The rank rides in a tensor and the shapes stay r: truncating to a Python int b would make
        compiled blocks recompile for every draw (and fall back to eager past dynamo's recompile limit)."""
        rank, a, b = self.sampled_rank, self.lora_A, self.lora_B
        if self.update_all:
            keep = (self.positions < rank).to(a.dtype)
            return a * keep[:, None], b * keep
        trained, frozen = ((self.positions == rank - 1).to(a.dtype), (self.positions < rank - 1).to(a.dtype))
        return (a * trained[:, None] + a.detach() * frozen[:, None],
                b * trained + b.detach() * frozen)

    def forward(self, layer, x, base):
        if self.training:
            (a, b), scale = self.training_factors(), self.alpha / self.sampled_rank
        else:
            (a, b), scale = self.factors(self.inference_rank), self.alpha / self.inference_rank
        return base(x) + linear(linear(self.dropout(x), a), b) * scale

    def delta_weight(self, layer) -> torch.Tensor:
        a, b = self.factors(self.inference_rank)
        return (self.alpha / self.inference_rank) * (b.float() @ a.float())


@register
@dataclass
class DyLoRA(LayerMethod):
    name: ClassVar[str] = "dylora"
    family: ClassVar[str] = "rank & structure"
    paper: ClassVar[str] = "DyLoRA, arXiv 2210.07558"
    formula: ClassVar[str] = "r·(in + out)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v")

    r: int = config_field(8, "maximum rank; every rank 1..r is trained")
    alpha: float = config_field(16.0, "scale numerator: rank b uses alpha / b")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    min_rank: int = config_field(1, "smallest rank drawn during training")
    update: str = config_field("last", "last: only the b-th row/column trains (official) | all: rows 1..b train")
    inference_rank: int | None = config_field(None, "rank used in eval mode and merge (None: r)")
    seed: int = config_field(0, "seed of the per-step rank draws and of the init")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(self.alpha > 0, self.name, f"alpha must be positive, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.min_rank, int) and 1 <= self.min_rank <= self.r, self.name,
              f"min_rank must be an integer in [1, r={self.r}], got {self.min_rank!r}")
        check(self.update in UPDATES, self.name, f"update must be one of {UPDATES}, got {self.update!r}")
        k = self.inference_rank
        check(k is None or (isinstance(k, int) and 1 <= k <= self.r), self.name,
              f"inference_rank must be None or an integer in [1, r={self.r}], got {k!r}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")

    @property
    def rank_for_inference(self) -> int:
        return self.r if self.inference_rank is None else self.inference_rank

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return DyLoRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features)

    def sample_rank(self, step: int) -> int:
        """The rank trained at optimizer step ``step`` (uniform on min_rank..r, reproducible)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return int(torch.randint(self.min_rank, self.r + 1, (1,), generator=gen).item())

    def on_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> None:
        rank = self.sample_rank(step.step)
        for adapter in adapters.values():
            adapter.train_rank = rank


def set_inference_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Use rank ``rank`` (1..r) for adapter ``name`` in eval mode, merge and later saves."""
    from peftlab.core import api

    config = api.adapters(model).get(name)
    if not isinstance(config, DyLoRA):
        raise ConfigError(f"adapter {name!r} is not a dylora adapter")
    check(isinstance(rank, int) and 1 <= rank <= config.r, config.name,
          f"inference rank must be an integer in [1, r={config.r}], got {rank!r}")
    config.inference_rank = rank
    for adapter in api.attached_adapters(model, name).values():
        adapter.inference_rank = rank
