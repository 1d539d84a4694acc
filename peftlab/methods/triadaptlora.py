"""TriAdaptLoRA: LoRA with a triangular-split core whose rank grows where it matters.

Liang, Wang, Zeng 2025, arXiv 2501.08008. Official code followed: the first author's PEFT fork in
YaoLiang2023/DiverValue-Bench, ``peft/src/peft/tuners/triadaptlora.py`` at commit
7ccb196eba10fd8eb506bd08f5d163adb472a6ef (file last changed in 448a1bbd "update"); no stand-alone
TriAdaptLoRA repository was found. Only the abstract of the paper could be read here.

Each adapted layer computes ΔW = s · B C A with a square core C split into a block-lower and a
block-upper triangular part (the diagonal blocks belong to both)::

        rank blocks:  b0 | b1 | b2 ...       (b0 = init_rank, then incre_rank_num each)

        C = L + U      L = [L00  0    0  ]     U = [U00 U01 U02]
                           [L10 L11   0  ]         [ 0  U11 U12]
                           [L20 L21  L22 ]         [ 0   0  U22]

    x ─► dropout ─► A (R x in) ─► C (R x R) ─► B (out x R) ─► (× s) ─► (+ W0 x + b) ─► y

Adding a block k appends rows to A, columns to B, a block row to L and a block column to U.

Importance (normalised Frobenius norm): for each layer, n = ‖C_active‖_F / (number of active
blocks); its score at an allocation step is the *change* of n since the previous allocation step
(the code's ``compute_score`` keeps ``preNormValue``). Rank growth (the code's ``RankAllocator``):
from step ``init_warmup`` on, every ``incre_interval`` steps while the total active rank is below the
budget T (default reference_rank × #layers), with c = (step - init_warmup) / (total_steps -
init_warmup) and R_now the total active rank, the number of layers to grow is

    linear:      m = int((T - R_now) · c)          non-linear: m = int(exp(c · ln(T - R_now)))

(at least 1); the threshold is the m-th largest score and every layer scoring at least the threshold
gains ``incre_rank_num`` ranks. The orthogonality regulariser of the code,
orth_reg_weight · mean over layers of (‖A Aᵀ - I‖_F + ‖Bᵀ B - I‖_F) on the active factors, is the
``regularization`` hook.

Shapes never change during training: every layer allocates ``max_rank`` rows/columns at build time
and a persistent buffer ``active_rank`` masks the unused ones (they get zero gradients). Growth runs
in ``on_step`` (before the step's micro-batches; the code grows after ``optimizer.step``, which is the
same point in the sequence). Scores and the regulariser are computed for all layers at once (stacked
per projection shape), and ranks are read on the host only when they change. The score bookkeeping
(``previous_norm``) and the ranks are persistent buffers, so a saved adapter resumes growth exactly.
The forward folds the activity mask and s into the core's two triangle masks (cached until
``active_rank`` changes) and the core into B, so a step costs LoRA's GEMMs plus a few R x R and out x R
ops.

Init (code at the commit above): A ~ N(0, 0.02), B = 0, the first diagonal block of both L and U is
the identity (so C starts at 2·I); the model is unchanged at init. Scale s = alpha with alpha 2: the
code's forward multiplies by a fixed 2 (its first commit used lora_alpha / current rank, kept here as
``rank_scaled=True``; with it the scale of the existing blocks drops when a layer grows).

Defaults (``TriAdaptLoraConfig``): reference_rank 8, init_rank 1, incre_rank_num reference_rank / 2
(the code's lookup table), init_warmup 0, incre_interval 1, linear growth, orth_reg_weight 0.5,
dropout 0 (LoraConfig's default).

Trainable parameters per adapted layer: R·(in + out) + 2·R² with R = max_rank (A, B and the two R x R
triangular parts, of which the entries outside each triangle are masked and never train).

Deviations, [peftlab]:
* ``max_rank`` (default init_rank + incre_rank_num · ceil(2·reference_rank / incre_rank_num), 17 at
  defaults): the code appends parameters without a per-layer cap; preallocation needs one. Layers at
  the cap are not eligible for growth.
* New blocks: the code initialises each appended rectangular block of L and U with ``eye_``, which
  puts its ones at the first columns (rows) of C, not on the new diagonal block, so growing changes
  the output (B_old · C[old, new] · A_new ≠ 0). Here a new block gets the identity on its own
  diagonal block in L and U and zeros elsewhere: growth is function-preserving (B_new = 0 and
  C[old, new] = 0), and the new block trains from the next step. Its A rows are re-drawn from
  N(0, 0.02) at activation (inactive rows only saw weight decay).
* Local generators (seeded from ``seed``, the site and the step) instead of the global RNG.
* ``top_k`` and ``weight_decay`` of the code's config are not used by its algorithm (the optimizer
  group for new parameters) and are not options here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import low_rank_update
from peftlab.core.method import LayerAdapter, LayerMethod, Site, TrainingStep, check, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import generator
from peftlab.core.stacked import gram_gaps, shape_groups

GROWTH = ("linear", "non-linear")
A_STD = 0.02


class TriAdaptLoRAAdapter(LayerAdapter):
    def __init__(self, config: TriAdaptLoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        dev = site.device
        size = config.max_rank_value
        self.alpha = config.alpha
        self.rank_scaled = config.rank_scaled
        self.init_rank = config.init_rank
        self.block_size = config.block
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(size, fan_in, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, size, device=dev))
        self.lower = nn.Parameter(torch.zeros(size, size, device=dev))
        self.upper = nn.Parameter(torch.zeros(size, size, device=dev))
        positions = torch.arange(size, device=dev)
        block = torch.where(positions < self.init_rank, 0, 1 + (positions - self.init_rank) // self.block_size)
        self.register_buffer("positions", positions, persistent=False)
        self.register_buffer("block_of", block, persistent=False)
        self.register_buffer("lower_mask", (block[None, :] <= block[:, None]).float(), persistent=False)
        self.register_buffer("upper_mask", (block[:, None] <= block[None, :]).float(), persistent=False)
        self.register_buffer("active_rank", torch.tensor(self.init_rank, device=dev))
        self.register_buffer("previous_norm", torch.zeros((), device=dev))
        if site.restoring:
            return
        gen = generator(config.seed, site.path)
        with torch.no_grad():
            self.lora_A.copy_(torch.randn(size, fan_in, generator=gen) * A_STD)
            eye = torch.eye(size, device=dev)
            self.lower.copy_(eye)
            self.upper.copy_(eye)
            self.previous_norm.copy_(normalised_norms([self])[0])

    # ---- the computation
    def mask(self) -> torch.Tensor:
        return (self.positions < self.active_rank).float()

    def core(self) -> torch.Tensor:
        """C = L + U on the active blocks (R x R, zero outside)."""
        m = self.mask()
        c = self.lower * self.lower_mask + self.upper * self.upper_mask
        return c * (m[:, None] * m[None, :])

    def scale(self) -> torch.Tensor | float:
        return self.alpha / self.active_rank.float() if self.rank_scaled else self.alpha

    def folded_masks(self) -> torch.Tensor:
        """s·(lower_mask ⊙ mmᵀ) and s·(upper_mask ⊙ mmᵀ) stacked (2 x R x R, the core's dtype), m the
        active mask: masking C on both sides masks B's columns and A's rows too (B D C D A = B (D C D) A
        for D = diag(m), D² = D).

        They change only with ``active_rank``, so they are kept until its version counter moves (every
        in-place write bumps it: ``grow``, ``load_state_dict``) or the tensor is replaced (a move)."""
        if torch.compiler.is_compiling() or self.active_rank.is_inference():
            return self._folded_masks()
        key = (*self._rank_key(), self.lower.dtype, self.lower.device)
        cache = self.__dict__.get("_masks_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self._folded_masks())
            self.__dict__["_masks_cache"] = cache
        return cache[1]

    def _folded_masks(self) -> torch.Tensor:
        m = self.mask().to(self.lower_mask.dtype)
        scale = self.alpha / self.active_rank.to(m.dtype) if self.rank_scaled else self.alpha
        active = (m[:, None] * m[None, :]) * scale
        return torch.stack([self.lower_mask * active, self.upper_mask * active]).to(self.lower.dtype)

    def forward(self, layer, x, base):
        """base(x) + (B·s·C) A x. The activity masks and s ride on the two R x R triangle masks (cached
        until the rank changes), so s·C = Σ [L; U] ⊙ [M_L; M_U] costs three small ops forward and one in
        backward; A and B need no masking (the masked core zeroes their inactive rows/columns and their
        gradients). s·C is folded into B (out x R), and the pair goes where LoRA's would: into the layer's own
        product when alone on it, without dropout and for enough tokens (core.layers.low_rank_update), else
        one addmm onto base(x)."""
        core = (torch.stack([self.lower, self.upper]) * self.folded_masks()).sum(0)
        return low_rank_update(layer, x, base, self.lora_A, self.lora_B @ core, folded=folds_into(layer),
                               dropout=self.dropout)

    def delta_weight(self, layer) -> torch.Tensor:
        m = self.mask()
        b, a = self.lora_B.float() * m[None, :], self.lora_A.float() * m[:, None]
        return self.scale() * (b @ self.core().float() @ a)

    # ---- growth bookkeeping
    def rank(self) -> int:
        """The active rank, read from the device only when ``active_rank`` changed (same key as the masks'
        cache): a read per layer and step would make the host wait for the GPU 112 times a step on a 1B
        model, for a value that changes only in growth rounds."""
        if self.active_rank.is_inference():  # such tensors keep no version counter
            return int(self.active_rank)
        cache = self.__dict__.get("_rank_cache")
        if cache is None or cache[0] != self._rank_key():
            cache = (self._rank_key(), int(self.active_rank))
            self.__dict__["_rank_cache"] = cache
        return cache[1]

    def _rank_key(self) -> tuple:
        rank = self.active_rank
        return id(rank), rank.data_ptr(), rank._version

    @torch.no_grad()
    def grow(self, gen: torch.Generator) -> None:
        """Activate the next block, leaving the layer's output unchanged."""
        start = self.rank()
        stop = start + self.block_size
        new = slice(start, stop)
        self.lora_A[new] = (torch.randn(stop - start, self.lora_A.shape[1], generator=gen) * A_STD).to(self.lora_A)
        self.lora_B[:, new] = 0
        self.lower[new, :] = 0
        self.upper[:, new] = 0
        eye = torch.eye(stop - start, device=self.lower.device)
        self.lower[new, new] = eye
        self.upper[new, new] = eye
        self.active_rank.fill_(stop)
        if not self.active_rank.is_inference():
            self.__dict__["_rank_cache"] = (self._rank_key(), stop)


def _stacked(layers: list[TriAdaptLoRAAdapter], name: str) -> torch.Tensor:
    return torch.stack([getattr(a, name) for a in layers])


def _active_masks(layers: list[TriAdaptLoRAAdapter]) -> torch.Tensor:
    """(layers x R) float masks of the active ranks, without reading the ranks on the host."""
    return (layers[0].positions < _stacked(layers, "active_rank")[:, None]).float()


def normalised_norms(layers: list[TriAdaptLoRAAdapter]) -> torch.Tensor:
    """‖C_active‖_F / #active blocks of every layer (one config: the block layout is shared), computed
    for all layers at once: per layer, these few R x R ops would be a few hundred kernel launches a step."""
    first = layers[0]
    m = _active_masks(layers)
    lower, upper = (_stacked(layers, name).detach().float() for name in ("lower", "upper"))
    cores = (lower * first.lower_mask + upper * first.upper_mask) * (m[:, :, None] * m[:, None, :])
    blocks = first.block_of[_stacked(layers, "active_rank") - 1] + 1
    return torch.linalg.matrix_norm(cores) / blocks


@torch.no_grad()
def importance_scores(layers: list[TriAdaptLoRAAdapter]) -> list[float]:
    """Change of every layer's normalised norm since the previous call (remembering the new values),
    read on the host once for all layers."""
    current = normalised_norms(layers)
    previous = [a.previous_norm for a in layers]
    scores = (current - torch.stack(previous)).tolist()
    torch._foreach_copy_(previous, list(current.unbind()))
    return scores


def orthogonality(layers: list[TriAdaptLoRAAdapter]) -> torch.Tensor:
    """‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F of every layer on its active factors (I the active diagonal)."""
    return _active_gram_norms(layers, "lora_A") + _active_gram_norms(layers, "lora_B")


def _active_gram_norms(layers: list[TriAdaptLoRAAdapter], name: str) -> torch.Tensor:
    """‖A Aᵀ − I‖_F (``lora_A``) or ‖Bᵀ B − I‖_F (``lora_B``) of every layer on its active ranks, one batched
    Gram per factor shape, in the layers' order."""
    rows = name == "lora_A"
    norms = [None] * len(layers)
    for group in shape_groups([getattr(a, name) for a in layers]):
        members = [layers[i] for i in group]
        m = _active_masks(members)
        factors = _stacked(members, name).float() * (m[:, :, None] if rows else m[:, None, :])
        values = torch.linalg.matrix_norm(gram_gaps(factors, rows, torch.diag_embed(m)))
        for i, value in zip(group, values.unbind()):
            norms[i] = value
    return torch.stack(norms)


@register
@dataclass
class TriAdaptLoRA(LayerMethod):
    name: ClassVar[str] = "triadaptlora"
    family: ClassVar[str] = "rank & structure"
    paper: ClassVar[str] = "TriAdaptLoRA, arXiv 2501.08008"
    formula: ClassVar[str] = "R·(in + out) + 2·R², R = max_rank"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False

    reference_rank: int = config_field(8, "target average rank; the budget is reference_rank x #layers")
    init_rank: int = config_field(1, "rank every layer starts with")
    incre_rank_num: int | None = config_field(None, "ranks added per growth (None: reference_rank // 2)")
    max_rank: int | None = config_field(None, "per-layer cap, preallocated (None: init + 2·reference, block-aligned)")
    target_total_rank: int | None = config_field(None, "total rank budget (None: reference_rank x #layers)")
    init_warmup: int = config_field(0, "optimizer steps before the first growth")
    incre_interval: int = config_field(1, "optimizer steps between growth rounds")
    rank_growth: str = config_field("linear", "linear | non-linear: how many layers grow per round")
    orth_reg_weight: float = config_field(0.5, "weight of the orthogonality regulariser on A and B")
    alpha: float = config_field(2.0, "scale s (s = alpha / active rank with rank_scaled)")
    rank_scaled: bool = config_field(False, "divide the scale by the current rank (the code's first commit)")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    seed: int = config_field(0, "seed of the initialisation and of re-drawn rows at growth")

    def validate(self) -> None:
        def positive_int(field_name: str, allow_none: bool = False, minimum: int = 1) -> None:
            value = getattr(self, field_name)
            ok = (allow_none and value is None) or (isinstance(value, int) and value >= minimum)
            check(ok, self.name, f"{field_name} must be {'None or ' if allow_none else ''}an integer >= {minimum}, "
                                 f"got {value!r}")

        positive_int("reference_rank")
        positive_int("init_rank")
        positive_int("incre_rank_num", allow_none=True)
        positive_int("max_rank", allow_none=True)
        positive_int("target_total_rank", allow_none=True)
        positive_int("init_warmup", minimum=0)
        positive_int("incre_interval")
        check(self.rank_growth in GROWTH, self.name, f"rank_growth must be one of {GROWTH}, got {self.rank_growth!r}")
        check(self.orth_reg_weight >= 0, self.name, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        check(self.alpha > 0, self.name, f"alpha must be positive, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")
        if self.max_rank is not None:
            extra = self.max_rank - self.init_rank
            check(extra >= 0 and extra % self.block == 0, self.name,
                  f"max_rank must be init_rank ({self.init_rank}) plus a multiple of incre_rank_num ({self.block}), "
                  f"got {self.max_rank}")

    @property
    def block(self) -> int:
        return self.incre_rank_num if self.incre_rank_num is not None else max(1, self.reference_rank // 2)

    @property
    def max_rank_value(self) -> int:
        if self.max_rank is not None:
            return self.max_rank
        return self.init_rank + self.block * math.ceil(2 * self.reference_rank / self.block)

    def build(self, site: Site) -> LayerAdapter:
        if self.max_rank_value > min(site.features):
            raise ConfigError(f"{self.name}: max_rank={self.max_rank_value} exceeds min(in, out) = "
                              f"{min(site.features)} at {site.path}; lower max_rank or reference_rank")
        return TriAdaptLoRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        size = self.max_rank_value
        return size * (in_features + out_features) + 2 * size * size

    # ---- training hooks
    def regularization(self, adapters: dict[str, nn.Module]) -> torch.Tensor | None:
        if self.orth_reg_weight == 0 or not adapters:
            return None
        return self.orth_reg_weight * orthogonality(list(adapters.values())).sum() / (2 * len(adapters))

    def budget(self, layers: int) -> int:
        return self.target_total_rank if self.target_total_rank is not None else self.reference_rank * layers

    def layers_to_grow(self, step: int, total_steps: int, remaining: int) -> int:
        """The code's ``compute_threshold``: how many layers the threshold admits this round."""
        span = total_steps - self.init_warmup
        progress = (step - self.init_warmup) / span if span > 0 else 1.0
        if self.rank_growth == "linear":
            count = int(remaining * progress)
        else:
            count = int(math.exp(progress * math.log(remaining)))
        return max(count, 1)

    def on_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> dict[str, float] | None:
        """A growth round when due; returns the scores it used (None when no round ran)."""
        if step.step <= self.init_warmup or step.step % self.incre_interval != 0:
            return None
        total = sum(a.rank() for a in adapters.values())
        target = self.budget(len(adapters))
        if total >= target:
            return None
        scores = dict(zip(adapters, importance_scores(list(adapters.values()))))
        eligible = [p for p, a in adapters.items() if a.rank() + a.block_size <= a.lora_A.shape[0]]
        if not eligible:
            return scores
        count = min(self.layers_to_grow(step.step, step.total_steps, target - total), len(eligible))
        threshold = sorted((scores[p] for p in eligible), reverse=True)[count - 1]
        for index, path in enumerate(adapters):
            if path in eligible and scores[path] >= threshold:
                adapters[path].grow(generator(self.seed, path, step.step, index))
        return scores


def rank_pattern(model: nn.Module, name: str = "default") -> dict[str, int]:
    """The active rank of every layer of adapter ``name``."""
    from peftlab.core import api

    return {path: a.rank() for path, a in api.attached_adapters(model, name).items()}
