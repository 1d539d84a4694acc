"""Per-layer terms computed for all layers at once. Layers of one projection share their shapes, so stacking
each shape's tensors keeps the work at a fixed number of kernels however deep the model: a loop of small ops
per layer is hundreds of kernel launches a step on a 1B model (regularisers, growth scores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shape_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by shape, dtype and device (each group stacks into one tensor), groups
    and members in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.shape, tensor.dtype, tensor.device), []).append(index)
    return list(groups.values())


def gram_gaps(stacked: torch.Tensor, rows: bool, identity: torch.Tensor) -> torch.Tensor:
    """M Mᵀ − I (``rows``: factors like A, r x n) or Mᵀ M − I (like B, n x r) of every matrix of a stack, as
    one batched product; ``identity`` is r x r or one per matrix. The Gram is formed from the stack as
    stored: a transposed stack would hand every layer a transposed gradient slice, which autograd then
    copies into its parameter's layout (two ops per layer)."""
    wide, tall = (stacked, stacked.mT) if rows else (stacked.mT, stacked)
    return torch.baddbmm(identity, wide, tall, beta=-1)
