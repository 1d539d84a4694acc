"""mtlora: MTLoRA, a task-agnostic LoRA shared by all tasks plus one task-specific LoRA per task.

Agiza, Neseem, Reda 2024 (CVPR), arXiv 2403.20320. Official code read: scale-lab/MTLoRA, commit
333a3750568f2ac9b8313fa6ff5dd86f517be13f (``models/lora.py``: ``MTLoRALinear``; ``config.py``: the
``MODEL.MTLORA`` defaults; ``configs/mtlora/tiny_448/*.yaml``: the released runs)::

    x ──► W0 ─────────────────────────────────────────────┐
    ├──► dropout ─► A_sh ─► B_sh ─► (· s_sh) ──────────────► (+)
    └──► dropout ─► A_t ──► B_t ──► (· s_t)  ──────────────► (+) ──► y      t = the example's task

    y_b = W0 x_b + b + s_sh · B_sh A_sh x_b + s_t · B_{t_b} A_{t_b} x_b       (one task id t_b per example)

TA-LoRA (A_sh: r x in, B_sh: out x r) is shared by every task; TS-LoRA (A_t: task_r x in, B_t: out x
task_r) belongs to task t. Every A starts Kaiming-uniform (a = √5), every B at zero, so the model is
unchanged at init. Scales are plain multipliers, as in the code (not alpha / r).

How the task reaches a layer: each example carries a task id through ``peftlab.task_ids`` (the trainer
sets it from the records' ``task`` field), and each example of a batch is routed to its own TS-LoRA,
so a batch may mix tasks. The whole update is computed for all examples at once: TA-LoRA and the T
task factors are stacked into one rank-(r + T·task_r) pair, each column weighted by a coefficient
(s_sh on TA-LoRA's, s_t on the example's task block, 0 on the other tasks'), and added onto the base
output by one addmm (``routed_update``): two GEMMs whatever the mix. When the whole batch has one
task (the usual case; the selector tells it from the ids it already checks on the host, without a
device sync) the coefficients are folded into the small B factor (out x rank) instead of the
token-sized activations, so a step costs little more than one LoRA of that rank (the joins of the
factors); a mixed batch weights the rank-sized activations x Aᵀ per example. Under torch.compile every
batch takes that per-example path, the ids read by an opaque op (``peftlab::task_ids``) when the graph
runs: dynamo cannot trace the ``task_ids`` context variable, and a branch on the ids in traced code would
break the graph or recompile it per layer; so one graph serves every layer, task and mix (a batch without
ids weights the task blocks 0, which gives their factors zero rather than no gradients).

Defaults (``config.py``): r 8 for TA and TS (``R_PER_TASK`` defaults to ``R``), shared and task scale
2.0, dropout 0.05; the released best runs use r 64 shared / 4 per task at scale 4
(``mtlora_tiny_448_r64_scale4_pertask.yaml``). Targets: all seven projections (the code adapts qkv,
proj, fc1 and fc2 of every Swin block). ``tasks`` (a count or the task names; the trainer fills in the
sorted names of the data's ``task`` values) has no paper default; 2 keeps ``peftlab methods`` working.

Trainable parameters per adapted layer: (r + T·task_r)·(in + out).

[peftlab] choices, not in the paper: (1) the paper's MTL model branches into per-task feature streams
at the end of each Swin stage (TS-LoRA outputs feed per-task decoders, the shared stream continues
with TA-LoRA only: the code's ``shared_mode='matrix'``); a decoder LM has one stream, so every adapted
layer adds TA + TS for the example's task, which is the code's ``shared_mode='matrixv2'`` task branch;
(2) TS-LoRA sits in every adapted layer (the code's ``INTERMEDIATE_SPECIALIZATION=True``) instead of
only in each stage's last block; (3) trainable scales (``TRAINABLE_SCALE_*``) are not offered.

Task ids, shared by the multi-task methods (``omnilora``, ``polyhistor``, ``divcontrol`` import them
from here): with no ``peftlab.task_ids`` block, ``default_task`` (an index or a name) applies to the
whole batch; without either, a method computes its task-agnostic part only (here TA-LoRA), or raises
ConfigError when it has none. Merging folds exactly what the forward computes for ONE task: select it
with ``with peftlab.task_ids(k): peftlab.merge(model)`` or ``default_task``; a selection of several
tasks, or none for an adapter with task-specific parts, raises MergeError.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError, MergeError
from peftlab.core.layers import add_product, linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.tasks import current_task_ids

# --------------------------------------------------------------------------------------------------
# Task ids: shared by every multi-task method


@dataclass
class MultiTaskMethod(LayerMethod):
    """Options every multi-task method has: the tasks, and the task used when a batch names none."""

    tasks: tuple[str, ...] | int = config_field(2, "number of tasks, or their names (the trainer fills in the "
                                                   "sorted names of the data's task field)")
    default_task: int | str | None = config_field(None, "task (index or name) used when no peftlab.task_ids "
                                                        "block is active; None: task-agnostic part only, or an error")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, list):
            self.tasks = tuple(self.tasks)
        super().__post_init__()

    def validate(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, tuple):
            check(len(tasks) > 0 and all(isinstance(t, str) and t for t in tasks), self.name,
                  f"tasks must be a positive count or a list of non-empty names, got {tasks!r}")
            check(len(set(tasks)) == len(tasks), self.name, f"task names repeat in {tasks!r}")
        else:
            check(isinstance(tasks, int) and not isinstance(tasks, bool) and tasks > 0, self.name,
                  f"tasks must be a positive count or a list of names, got {tasks!r}")
        self.default_task_index  # noqa: B018  raises ConfigError when it names no task

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks if isinstance(self.tasks, tuple) else tuple(str(i) for i in range(self.tasks))

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def default_task_index(self) -> int | None:
        task = self.default_task
        if task is None:
            return None
        if isinstance(task, str) and task in self.task_names:
            return self.task_names.index(task)
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < self.num_tasks:
            return task
        raise ConfigError(f"{self.name}: default_task {task!r} names none of the {self.num_tasks} tasks "
                          f"{list(self.task_names)}")


# The last resolved id tensor: every adapted layer of one forward reads the same ``task_ids`` tensor, so
# it is checked and moved to the device once, not once per layer (which would sync a GPU per layer).
_RESOLVED: list = [None]


@functools.cache
def _default_ids(task: int) -> torch.Tensor:
    """One tensor per default task, shared by all layers, so the resolved-ids cache serves them too."""
    return torch.tensor(task)


class TaskSelector:
    """Which task each example of a batch belongs to, for one attachment's adapters."""

    def __init__(self, config: MultiTaskMethod):
        self.method = config.name
        self.count = config.num_tasks
        self.default_index = config.default_task_index

    @property
    def default(self) -> torch.Tensor | None:
        """The default task's ids (one shared tensor per task), or None without a default."""
        return None if self.default_index is None else _default_ids(self.default_index)

    def for_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        """One task id per example of ``x`` (batch first) on x's device, or None when none is set."""
        resolved = self._resolve(x)
        return None if resolved is None else resolved[0]

    def required_ids(self, x: torch.Tensor) -> torch.Tensor:
        """One id per example of ``x`` on x's device, ConfigError when no task is set; in compiled code
        from ``traced_ids``."""
        if torch.compiler.is_compiling():
            return self.traced_ids(x, required=True)
        ids = self.for_batch(x)
        if ids is None:
            raise self.missing()
        return ids

    def route(self, x: torch.Tensor) -> int | torch.Tensor | None:
        """How ``x``'s examples are routed: None when no task is set, the task (an int) when every
        example has the same one, else one id per example on x's device (as ``for_batch``). The
        single-task test runs on the host copy of the ids, once per forward (no device sync).
        Eager only: compiled code calls ``traced_ids``."""
        resolved = self._resolve(x)
        if resolved is None:
            return None
        return resolved[0] if resolved[1] is None else resolved[1]

    def traced_ids(self, x: torch.Tensor, required: bool) -> torch.Tensor:
        """For code torch.compile traces: one id per example on x's device, ``count`` for each when no
        task is set (ConfigError when ``required``). Dynamo cannot read the context variable that holds
        the ids, and a Python branch on them would break the graph or recompile it per layer, so they
        come from an opaque op that runs when the graph does: one graph serves every layer, task and
        mix of tasks."""
        default = -1 if self.default_index is None else self.default_index
        return _traced_task_ids(self.method, self.count, default, _batch_of(x), x.device, required)

    def _resolve(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None] | None:
        return _resolve_ids(self.method, self.count, self.default, _batch_of(x), x.device)

    def merge_task(self) -> int | None:
        """The single task a merge folds in (None: no task selected); several tasks raise MergeError."""
        ids = current_task_ids()
        if ids is None:
            ids = self.default
        if ids is None:
            return None
        unique = ids.detach().to("cpu").unique()
        if unique.numel() != 1:
            raise MergeError(f"{self.method}: a merge folds in one task; the task ids select {unique.tolist()}")
        return int(_checked_ids(self.method, self.count, unique, 1)[0])

    def required_merge_task(self) -> int:
        task = self.merge_task()
        if task is None:
            raise MergeError(f"{self.method}: a merge folds in one task; select it with "
                             f"`with peftlab.task_ids(k): peftlab.merge(model)` or the default_task option")
        return task

    def missing(self) -> ConfigError:
        return _missing(self.method)


def _batch_of(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


def _missing(method: str) -> ConfigError:
    return ConfigError(f"{method}: this adapter has no task-agnostic part, so every batch needs task ids: "
                       f"wrap the call in `with peftlab.task_ids(ids):` or set default_task")


def _resolve_ids(method: str, count: int, default: torch.Tensor | None, batch: int,
                 device: torch.device) -> tuple[torch.Tensor, int | None] | None:
    """(checked ids on ``device``, the task when all examples share one, else None), or None when no
    task is set."""
    ids = current_task_ids()
    if ids is None:
        ids = default
    if ids is None:
        return None
    key = (batch, device, count, ids._version)  # _version: an in-place edit is seen
    cached = _RESOLVED[0]
    if cached is not None and cached[0]() is ids and cached[1] == key:
        return cached[2]
    checked = _checked_ids(method, count, ids.detach().to("cpu"), batch)
    single = int(checked[0]) if checked.numel() and bool((checked == checked[0]).all()) else None
    resolved = (checked.to(device), single)
    _RESOLVED[0] = (weakref.ref(ids), key, resolved)
    return resolved


def _checked_ids(method: str, count: int, ids: torch.Tensor, batch: int) -> torch.Tensor:
    if ids.numel() == 1:
        ids = ids.reshape(1).expand(batch)
    elif ids.dim() != 1 or ids.numel() != batch:
        raise ConfigError(f"{method}: peftlab.task_ids gave {ids.numel()} task ids for a batch of {batch} "
                          f"examples; give one id per example, or one int for the whole batch")
    if bool(((ids < 0) | (ids >= count)).any()):
        raise ConfigError(f"{method}: task ids must lie in [0, {count}), got {ids.unique().tolist()}")
    return ids.long()


# A CUDA graph would replay the ids it saw when it was recorded: the tag keeps the op out of graphs (torch
# then records the code around it, or runs the block without graphs).
_OUTSIDE_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("peftlab::task_ids", mutates_args=(), tags=_OUTSIDE_CUDA_GRAPHS)
def _traced_task_ids(method: str, count: int, default: int, batch: int, device: torch.device,
                     required: bool) -> torch.Tensor:
    """TaskSelector.traced_ids as an op (default < 0: none). The ops of one compiled block have the same
    arguments, so they merge into one call per block."""
    resolved = _resolve_ids(method, count, None if default < 0 else _default_ids(default), batch, device)
    if resolved is None:
        if required:
            raise _missing(method)
        return torch.full((batch,), count, dtype=torch.long, device=device)
    return resolved[0].clone()  # not the cached tensor: the compiled graph owns its ops' outputs


@_traced_task_ids.register_fake
def _(method, count, default, batch, device, required):
    return torch.empty(batch, dtype=torch.long, device=device)


def block_coefficients(ids: torch.Tensor, count: int, rank: int, scale: float = 1.0) -> torch.Tensor:
    """(batch, count·rank): ``scale`` on the rank block of each example's task, 0 elsewhere."""
    one_hot = nn.functional.one_hot(ids, count).float() * scale
    return one_hot.repeat_interleave(rank, dim=1)


def routed_update(out: torch.Tensor, x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                  coefficients: torch.Tensor | float | None = None) -> torch.Tensor:
    """out + Σ_k c_k·B[:, k] (A[k] · x_b) per example b, as one addmm onto ``out`` (the base output).

    A (K x in) and B (out x K) hold K rank-one components. ``coefficients`` weights them: None or a
    number for every component and example, a (K,) tensor for every example (both folded into B, so
    the token-sized activations only meet the two GEMMs), or (batch, K) per example (batch first in x),
    applied to the rank-K activations x Aᵀ."""
    xa = linear(x.reshape(-1, x.shape[-1]), a_all)
    per_example = isinstance(coefficients, torch.Tensor) and coefficients.dim() == 2
    if per_example:
        shape = (coefficients.shape[0],) + (1,) * (x.dim() - 2) + (coefficients.shape[1],)
        rows = xa.view(x.shape[:-1] + (xa.shape[-1],)) * coefficients.view(shape).to(xa.dtype)
        xa = rows.reshape(-1, xa.shape[-1])
    elif coefficients is not None and not (isinstance(coefficients, float) and coefficients == 1.0):
        b_all = b_all * coefficients
    return add_product(out, xa, b_all)


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, device) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=√5) for a weight whose fan-in is ``fan_in``: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, device=device).uniform_(-bound, bound)


# --------------------------------------------------------------------------------------------------
# A shared LoRA plus per-task LoRAs (MTLoRA, and Omni-AVSR's three strategies)


class SharedTaskLoRAAdapter(LayerAdapter):
    """y = base(x) + s_sh·B_sh A_sh h + s_t·B_t A_t h, h = dropout(x); either part may be absent.

    ``task_A`` is stored (T, task_r, in) and ``task_B`` (out, T, task_r), so both flatten to the
    stacked rank-T·task_r pair without a copy; with the shared pair in front they make one
    rank-(shared_r + T·task_r) product (``routed_update``) whose column coefficients come from a
    per-task table built once per device. ``zero_side`` names the factor that starts at zero (the
    other is Kaiming-uniform over its own fan-in).
    """

    def __init__(self, site: Site, selector: TaskSelector, *, shared_r: int, task_r: int, shared_scale: float,
                 task_scale: float, dropout: float, zero_side: str):
        super().__init__()
        fan_in, fan_out = site.features
        dev, count = site.device, selector.count
        self.selector = selector
        self.shared_scale, self.task_scale, self.task_r = shared_scale, task_scale, task_r
        self._tables: dict[tuple, torch.Tensor] = {}  # coefficient_table's cache
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared_A = nn.Parameter(torch.zeros(shared_r, fan_in, device=dev)) if shared_r else None
        self.shared_B = nn.Parameter(torch.zeros(fan_out, shared_r, device=dev)) if shared_r else None
        self.task_A = nn.Parameter(torch.zeros(count, task_r, fan_in, device=dev)) if task_r else None
        self.task_B = nn.Parameter(torch.zeros(fan_out, count, task_r, device=dev)) if task_r else None
        if site.restoring:
            return
        with torch.no_grad():
            for a, b, r in ((self.shared_A, self.shared_B, shared_r), (self.task_A, self.task_B, task_r)):
                if a is None:
                    continue
                if zero_side == "B":
                    a.copy_(kaiming_uniform(a.shape, fan_in, dev))
                else:
                    b.copy_(kaiming_uniform(b.shape, r, dev))

    def forward(self, layer, x, base):
        if torch.compiler.is_compiling():
            return self._traced_forward(x, base)
        out = base(x)
        route = self.selector.route(x)
        if route is None and self.shared_A is None:
            raise self.selector.missing()
        h = self.dropout(x)
        if route is None or self.task_A is None:  # TA-LoRA only
            return routed_update(out, h, self.shared_A, self.shared_B, self.shared_scale)
        a_all, b_all = self.task_A.flatten(0, 1), self.task_B.flatten(1, 2)
        table = self.coefficient_table(a_all.device)
        shared = self.shared_A is not None
        if isinstance(route, int):  # one task: the coefficients ride on B's pieces before they are joined
            coefficients = None
            b_all = b_all * table[route, table.shape[1] - b_all.shape[1]:]
            if shared:
                b_all = torch.cat([self.shared_B * self.shared_scale, b_all], dim=1)
        else:
            coefficients = table[route]
            if shared:
                b_all = torch.cat([self.shared_B, b_all], dim=1)
        if shared:
            a_all = torch.cat([self.shared_A, a_all])
        return routed_update(out, h, a_all, b_all, coefficients)

    def _traced_forward(self, x, base):
        """forward as torch.compile traces it: the ids come as a tensor (``TaskSelector.traced_ids``), so
        every batch takes the per-example path, each example's ``coefficient_table`` row built in the graph
        from its id. The no-task id ``count`` gets s_sh on the shared columns and 0 on the task ones:
        TA-LoRA's output, with zero instead of no gradients for the task factors."""
        out, h = base(x), self.dropout(x)
        if self.task_A is None:
            return routed_update(out, h, self.shared_A, self.shared_B, self.shared_scale)
        count = self.selector.count
        ids = self.selector.traced_ids(x, required=self.shared_A is None)
        hit = ids[:, None] == torch.arange(count, device=ids.device)  # no row hits for id ``count``
        coefficients = (hit.float() * self.task_scale).repeat_interleave(self.task_r, dim=1)
        a_all, b_all = self.task_A.flatten(0, 1), self.task_B.flatten(1, 2)
        if self.shared_A is not None:
            shared = coefficients.new_full((ids.shape[0], self.shared_A.shape[0]), float(self.shared_scale))
            coefficients = torch.cat([shared, coefficients], dim=1)
            a_all, b_all = torch.cat([self.shared_A, a_all]), torch.cat([self.shared_B, b_all], dim=1)
        return routed_update(out, h, a_all, b_all, coefficients)

    def coefficient_table(self, device) -> torch.Tensor:
        """(T, shared_r + T·task_r): row t weights the stacked columns for task t: s_sh on the shared
        ones, s_t on task t's block, 0 on the other tasks'. Constant, so it is built once per device
        (and scales)."""
        key = (device, self.shared_scale, self.task_scale)
        table = self._tables.get(key)
        if table is None:
            count = self.selector.count
            table = block_coefficients(torch.arange(count), count, self.task_r, self.task_scale)
            if self.shared_A is not None:
                shared = torch.full((count, self.shared_A.shape[0]), float(self.shared_scale))
                table = torch.cat([shared, table], dim=1)
            table = self._tables[key] = table.to(device)
        return table

    def delta_weight(self, layer) -> torch.Tensor:
        delta = 0.0
        if self.task_A is not None:
            task = self.selector.required_merge_task()
            delta = self.task_scale * (self.task_B[:, task].float() @ self.task_A[task].float())
        if self.shared_A is not None:
            delta = delta + self.shared_scale * (self.shared_B.float() @ self.shared_A.float())
        return delta


def check_rank(method: str, rank: int, site: Site) -> None:
    if rank > min(site.features):
        raise ConfigError(f"{method}: rank {rank} exceeds min(in, out) = {min(site.features)} at {site.path}")


# --------------------------------------------------------------------------------------------------


@register
@dataclass
class MTLoRA(MultiTaskMethod):
    name: ClassVar[str] = "mtlora"
    family: ClassVar[str] = "multi-task"
    paper: ClassVar[str] = "MTLoRA, arXiv 2403.20320"
    formula: ClassVar[str] = "(r + T·task_r)·(in + out)"
    mergeable: ClassVar[bool] = True  # for one selected task
    identity_at_init: ClassVar[bool] = True

    r: int = config_field(8, "rank of the task-agnostic TA-LoRA")
    task_r: int = config_field(8, "rank of each task-specific TS-LoRA")
    shared_scale: float = config_field(2.0, "multiplier of the TA-LoRA update")
    task_scale: float = config_field(2.0, "multiplier of the TS-LoRA update")
    dropout: float = config_field(0.05, "dropout on the adapter's input")

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "r", "task_r")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")

    def build(self, site: Site) -> LayerAdapter:
        check_rank(self.name, max(self.r, self.task_r), site)
        return SharedTaskLoRAAdapter(site, TaskSelector(self), shared_r=self.r, task_r=self.task_r,
                                     shared_scale=self.shared_scale, task_scale=self.task_scale,
                                     dropout=self.dropout, zero_side="B")

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return (self.r + self.num_tasks * self.task_r) * (in_features + out_features)
