"""Triton kernel for W + B A with a low rank r (peftlab.kernels.merged_weight).

One program per output tile reads its tile of W, adds B_tile · A_tile (a product of inner size r,
accumulated in fp32) and writes the sum: one read and one write of the weight. torch.addmm(W, B, A)
moves twice that: it first copies W into its result, then has cuBLAS read and overwrite it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 128  # rows and columns of a program's tile; halved for ranks above 64 to bound the factors' tiles
MAX_RANK = 128  # larger ranks stay with torch.addmm (the factors' tiles would outgrow shared memory)


@triton.jit
def _merged_kernel(weight_ptr, b_ptr, a_ptr, out_ptr, rows, columns, rank,
                   weight_row_stride, weight_column_stride, b_row_stride, b_column_stride,
                   a_row_stride, a_column_stride, TILE: tl.constexpr, RANK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)  # int64: offsets may pass 2^31
    column = tl.program_id(1) * TILE + tl.arange(0, TILE)
    k = tl.arange(0, RANK)  # rank padded to a power of two >= 16 (tl.dot's least inner size); padding is 0
    b = tl.load(b_ptr + row[:, None] * b_row_stride + k[None, :] * b_column_stride,
                mask=(row[:, None] < rows) & (k[None, :] < rank), other=0.0)
    a = tl.load(a_ptr + k[:, None] * a_row_stride + column[None, :] * a_column_stride,
                mask=(k[:, None] < rank) & (column[None, :] < columns), other=0.0)
    inside = (row[:, None] < rows) & (column[None, :] < columns)
    weight = tl.load(weight_ptr + row[:, None] * weight_row_stride + column[None, :] * weight_column_stride,
                     mask=inside, other=0.0)
    merged = weight.to(tl.float32) + tl.dot(b, a, out_dtype=tl.float32)
    tl.store(out_ptr + row[:, None] * columns + column[None, :], merged.to(out_ptr.dtype.element_ty), mask=inside)


def merged_weight(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """W + B A (out x in, contiguous) for W, B, A of one dtype, any strides, rank up to MAX_RANK."""
    rows, columns = weight.shape
    rank = a.shape[0]
    padded = max(16, triton.next_power_of_2(rank))
    tile = TILE if padded <= 64 else TILE // 2
    out = torch.empty(rows, columns, dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(rows, tile), triton.cdiv(columns, tile))
    _merged_kernel[grid](weight, b, a, out, rows, columns, rank, *weight.stride(), *b.stride(), *a.stride(),
                         TILE=tile, RANK=padded, num_warps=8)
    return out
