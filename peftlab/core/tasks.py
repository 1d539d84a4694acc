"""Per-example task ids for multi-task adapters.

    with peftlab.task_ids(torch.tensor([0, 2, 1])):   # one id per example of the batch
        model(**batch)

Task-aware adapters read ``current_task_ids()`` in their forward (None outside such a block); a
single int applies to the whole batch. The trainer sets it from a ``task`` field of the records.
A context variable keeps concurrent calls (threads, nested generation) apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_CURRENT: ContextVar[torch.Tensor | None] = ContextVar("peftlab_task_ids", default=None)


@contextmanager
def task_ids(ids: torch.Tensor | int | Sequence[int]):
    tensor = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, dtype=torch.long)
    if tensor.dim() > 1 or tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError("task ids must be an int or a 1-D integer tensor (one id per example)")
    token = _CURRENT.set(tensor)
    try:
        yield tensor
    finally:
        _CURRENT.reset(token)


def current_task_ids() -> torch.Tensor | None:
    return _CURRENT.get()
