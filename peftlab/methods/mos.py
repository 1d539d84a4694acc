"""MoS, Mixture of Shards: LoRA factors assembled from shard pools shared across layers.

Wang, Chen, Chen, Dong, Xue, Jiang, Kong, Wu 2024 (ICLR 2025), arXiv 2410.00938. Official code
followed: Forence1999/MoS, ``modules/Tied_LoRA.py`` (``share_lora_tiedly``, ``transform_chunks``,
``LoraLayer_reset_lora_parameters``) at commit cafb8dd8d1c37856ebefa609ebc8264072fc502b, and its run
configuration (``.vscode/launch.json``, ``ft_llama2_7b_*.sh``, ``model_param_summary.txt``).

Every projection kind (q, k, v, o, gate, up, down) has one global pool per factor, shared by all
layers; a layer's A and B are concatenations of shards picked from the pools::

    pool_A: e·L·l shards of length in/l           pool_B: e·L·l shards of length out/l
    ┌───────── public: (e−p)·L·l ─────────┬── private: p·l per layer ──┐
    │ s0 s1 s2 ...  (any layer may pick)  │ layer0 │ layer1 │ ...      │
    └─────────────────────────────────────┴────────┴────────┴──────────┘

    A_i[j] = pool_A[I_i[j, 0]] ⊕ pool_A[I_i[j, 1]] ⊕ ... ⊕ pool_A[I_i[j, l−1]]   (row j of r x in)
    B_i[:, j] = pool_B[J_i[j, 0]] ⊕ ... ⊕ pool_B[J_i[j, l−1]]                   (column j of out x r)
    y = W0 x + b + (alpha / r) · B_i A_i dropout(x)

with L the number of layers sharing the pool, r the rank each layer uses, e the *equivalent* rank
(the parameter budget: e·(in + out) per layer, as a rank-e LoRA), p the private rank and l the
shards per vector. The four differentiation strategies:

* subset selection: each layer uses r vectors, drawn from a public pool larger than one layer's
  share; the (r − p)·l public shards of layer i are a random subset (without repetition) of the
  public shards (the paper's "MoE-like router": in the code a fixed random index, drawn at init);
* pair dissociation: the indices I_i of A and J_i of B are drawn independently;
* vector sharding: each rank vector is the concatenation of l shards (l = 1: whole vectors);
* shard privatisation: the last p vectors of every layer come from shards only that layer uses.

The indices are fixed at init (not trained); A's pool starts Kaiming-uniform over the full input
width (bound 1/√in, as the code's ``kaiming_uniform_`` with ``dim = in``), B's pool at zero, so the
model is unchanged at init.

Defaults (the official debug run in ``launch.json``, ``--ft_mode mos``): r 16, equivalent_rank 4,
private_rank 2, shards_per_vector 4, alpha 16, dropout 0.1, all seven projections
(``--lora_modules all``). ``model_param_summary.txt`` lists 9,994,240 trainable parameters on
Llama-2-7B for equivalent rank 4, which this formula reproduces.

Trainable parameters: e·L·(in + out) per pool, i.e. exactly e·(in + out) per adapted layer when
summed over a pool's layers; that per-layer amortisation is ``trainable_count``.

How the shared pools are stored (peftlab's core builds one adapter per layer and has no cross-layer
build step; see ``_PoolBank``): the pools of a group are ``nn.Parameter``s of the group's *owner*,
the adapter of its first layer in target order. Other layers keep a plain (unregistered) Python
reference to the owner, so the pool appears once in ``model.parameters()``, once in the optimizer,
once in the saved file (under the owner's path) and once in the trainable count; every layer's index
tensors are persistent buffers. Save/load rebuilds the same groups in the same order (the saved
paths), so the owner is again the first path. Merge folds each layer's B_i A_i into its weight; the
owner is still attached while the others merge.

Deviations: the code's "random scaling" vectors (``lora_A_vec`` / ``lora_A_anti_vec``) are
asserted to be 1 in that code, so they are omitted. The index draws use a local generator seeded
from ``seed`` and the pool key instead of the global RNG. [peftlab] pools are keyed by (role, in,
out); layers of unknown role share a pool by shape. The indices are recomputable from the config, but
are saved anyway (persistent buffers) so a file does not depend on torch's random-number algorithm.
Because the pool size depends on how many layers share it, and the core builds layers one at a
time, the pools are re-sized as layers are added during ``adapt``; a configuration whose public pool
is too small for r (needs (r − p) ≤ (e − p)·L) can therefore only be detected once all layers are
built, and is reported by a ConfigError at the first forward or merge.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import slot_of
from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import generator


class MoSAdapter(LayerAdapter):
    def __init__(self, config: MoS, site: Site, owner: MoSAdapter | None):
        super().__init__()
        fan_in, fan_out = site.features
        self.rank = config.r
        self.scale = config.alpha / config.r
        self.shards = config.shards_per_vector
        self.features = (fan_in, fan_out)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        shape = (config.r, config.shards_per_vector)
        self.register_buffer("index_A", torch.zeros(shape, dtype=torch.long, device=site.device))
        self.register_buffer("index_B", torch.zeros(shape, dtype=torch.long, device=site.device))
        self.__dict__["owner"] = self if owner is None else owner  # not a submodule: no duplicate tensors
        self.problem: str | None = None

    @property
    def is_owner(self) -> bool:
        return self.owner is self

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x in, B: out x r) assembled from the shared pools."""
        if self.problem:
            raise ConfigError(self.problem)
        pool_a, pool_b = self.owner.pool_A, self.owner.pool_B
        a = pool_a[self.index_A].reshape(self.rank, -1)
        b = pool_b[self.index_B].reshape(self.rank, -1).T
        return a, b

    def forward(self, layer, x, base):
        a, b = self.factors()
        return base(x) + linear(linear(self.dropout(x), a), b) * self.scale

    def delta_weight(self, layer) -> torch.Tensor:
        a, b = self.factors()
        return self.scale * (b.float() @ a.float())


class _Pool:
    """The layers sharing one pair of pools; the first member owns the parameters.

    Held through weak references: the adapters live in the model (and, while ``adapt`` runs, in its
    list of built adapters), so a config object kept by the user does not keep a deleted model alive.
    """

    def __init__(self, key: str):
        self.key = key
        self.member_refs: list[weakref.ref] = []
        self.module_refs: list[weakref.ref] = []

    def add(self, adapter: MoSAdapter, module: nn.Module) -> None:
        self.member_refs.append(weakref.ref(adapter))
        self.module_refs.append(weakref.ref(module))

    @property
    def members(self) -> list[MoSAdapter | None]:
        return [ref() for ref in self.member_refs]


class _PoolBank:
    """The pools of one attachment while ``adapt`` / ``load`` builds it (kept on the config object).

    A new bank starts when a path is built twice or when a member of the current bank is already
    attached to the model, i.e. when the same config object is reused for another attachment.
    Copies and pickles of a config carry an empty bank.
    """

    def __init__(self, restoring: bool = False):
        self.restoring = restoring
        self.pools: dict[str, _Pool] = {}
        self.paths: set[str] = set()

    def __deepcopy__(self, memo):
        return _PoolBank()

    def __reduce__(self):
        return (_PoolBank, ())

    def finished(self) -> bool:
        for pool in self.pools.values():
            for module_ref, adapter_ref in zip(pool.module_refs, pool.member_refs):
                module, adapter = module_ref(), adapter_ref()
                if module is None or adapter is None:  # that build is long gone
                    return True
                slot = slot_of(module)
                if slot is not None and any(a is adapter for a in slot.values()):
                    return True
        return False


@register
@dataclass
class MoS(LayerMethod):
    name: ClassVar[str] = "mos"
    family: ClassVar[str] = "rank & structure"
    paper: ClassVar[str] = "MoS (Mixture of Shards), arXiv 2410.00938"
    formula: ClassVar[str] = "e·(in + out) per layer (L layers share pools of e·L·(in + out))"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False

    r: int = config_field(16, "rank each layer uses (vectors assembled per layer)")
    equivalent_rank: int = config_field(4, "parameter budget e: pools hold e·(in + out) per layer")
    private_rank: int = config_field(2, "vectors per layer taken from shards only that layer uses")
    shards_per_vector: int = config_field(4, "l: shards concatenated into one rank vector")
    alpha: float = config_field(16.0, "scale numerator: s = alpha / r")
    dropout: float = config_field(0.1, "dropout on the adapter's input")
    pair_dissociation: bool = config_field(True, "draw A's and B's shard indices independently")
    seed: int = config_field(0, "seed of the pool initialisation and of the shard indices")

    def validate(self) -> None:
        check_positive_ints(self, "r", "equivalent_rank", "shards_per_vector")
        p = self.private_rank
        check(isinstance(p, int) and 0 <= p <= min(self.r, self.equivalent_rank), self.name,
              f"private_rank must be an integer in [0, min(r, equivalent_rank)] = "
              f"[0, {min(self.r, self.equivalent_rank)}], got {p!r}")
        check(p < self.equivalent_rank or self.r == p, self.name,
              f"private_rank = equivalent_rank = {p} leaves no public pool, so r must equal it too (got r={self.r})")
        check(self.alpha > 0, self.name, f"alpha must be positive, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.pair_dissociation, bool), self.name, "pair_dissociation must be true or false")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.equivalent_rank * (in_features + out_features)

    # ---- building: one adapter per layer, pools wired across layers
    def _bank(self, site: Site) -> _PoolBank:
        bank = self.__dict__.get("_pool_bank")
        if bank is None or site.path in bank.paths or bank.restoring != site.restoring or bank.finished():
            bank = _PoolBank(site.restoring)
            self.__dict__["_pool_bank"] = bank
        bank.paths.add(site.path)
        return bank

    def build(self, site: Site) -> LayerAdapter:
        fan_in, fan_out = site.features
        if fan_in % self.shards_per_vector or fan_out % self.shards_per_vector:
            raise ConfigError(f"{self.name}: shards_per_vector={self.shards_per_vector} must divide the layer's "
                              f"in and out sizes ({fan_in}, {fan_out}) at {site.path}")
        bank = self._bank(site)
        key = f"{site.role or 'layer'}:{fan_in}x{fan_out}"
        pool = bank.pools.setdefault(key, _Pool(key))
        adapter = MoSAdapter(self, site, pool.members[0] if pool.member_refs else None)
        pool.add(adapter, site.module)
        self._size_pool(pool, site)
        return adapter

    def _size_pool(self, pool: _Pool, site: Site) -> None:
        """(Re-)allocate the pool for its current members and (re-)draw every member's indices."""
        members = pool.members
        if any(m is None for m in members):
            raise ConfigError(f"{self.name}: an adapter of pool {pool.key} vanished while the pools were being built")
        owner, layers, shards = members[0], len(members), self.shards_per_vector
        e, p, r = self.equivalent_rank, self.private_rank, self.r
        fan_in, fan_out = owner.features
        total = e * layers * shards
        device = owner.index_A.device
        pool_a = torch.zeros(total, fan_in // shards)
        if not site.restoring:
            bound = 1.0 / math.sqrt(fan_in)
            pool_a.uniform_(-bound, bound, generator=generator(self.seed, pool.key, "A"))
        owner.pool_A = nn.Parameter(pool_a.to(device))
        owner.pool_B = nn.Parameter(torch.zeros(total, fan_out // shards, device=device))
        if site.restoring:  # indices come from the file
            return
        public = (e - p) * layers * shards
        need = (r - p) * shards
        if need > public:
            problem = (f"{self.name}: the public pool of {pool.key} holds (equivalent_rank - private_rank) x layers = "
                       f"{(e - p) * layers} vectors, fewer than the r - private_rank = {r - p} each layer draws; "
                       f"lower r, raise equivalent_rank or adapt more layers")
            for member in members:
                member.problem = problem
            return
        gen = generator(self.seed, pool.key, "index")
        for k, member in enumerate(members):
            private = public + torch.arange(k * p * shards, (k + 1) * p * shards)
            shared_a = torch.randperm(public, generator=gen)[:need]
            shared_b = torch.randperm(public, generator=gen)[:need] if self.pair_dissociation else shared_a
            member.index_A.copy_(torch.cat([shared_a, private]).view(r, shards))
            member.index_B.copy_(torch.cat([shared_b, private]).view(r, shards))
            member.problem = None


def pool_of(adapter: MoSAdapter) -> tuple[nn.Parameter, nn.Parameter]:
    """The (pool_A, pool_B) parameters an adapter reads (stored on its pool's owner)."""
    return adapter.owner.pool_A, adapter.owner.pool_B
