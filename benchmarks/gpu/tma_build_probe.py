"""Probe: W + s·B A as one Triton GEMM with tensor-memory (TMA) descriptors, against addmm and a plain mm, on
RandLoRA's 1B build shapes (benchmarks/gpu/randlora_build_probe.py has the pointer-load kernel: at most 600
TFLOP/s there, where cuBLAS's mm alone ran at 710 to 760).

    python3 benchmarks/gpu/tma_build_probe.py
"""

from functools import partial

import torch
import triton
import triton.language as tl
from kernels_probe import milliseconds
from randlora_build_probe import LAYERS, SCALE, factors
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _merged_tma_kernel(weight_desc, b_desc, a_desc, out_desc, rows, columns, inner, scale,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCK_INNER: tl.constexpr,
                       GROUP_ROWS: tl.constexpr, TRANSPOSED: tl.constexpr):
    program = tl.program_id(0)
    tile_rows, tile_columns = tl.cdiv(rows, BLOCK_ROWS), tl.cdiv(columns, BLOCK_COLUMNS)
    group_width = GROUP_ROWS * tile_columns
    first_row = (program // group_width) * GROUP_ROWS
    group_rows = min(tile_rows - first_row, GROUP_ROWS)
    first = (first_row + (program % group_width) % group_rows) * BLOCK_ROWS
    second = ((program % group_width) // group_rows) * BLOCK_COLUMNS
    product = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    for start in range(0, inner, BLOCK_INNER):
        product = tl.dot(b_desc.load([first, start]), a_desc.load([start, second]), product)
    if TRANSPOSED:  # W and the result are stored (columns, rows): RandLoRA's ΔWᵀ = B_flat Â on wide layers
        weight = tl.trans(weight_desc.load([second, first]))
        merged = (weight.to(tl.float32) + scale * product).to(weight.dtype)
        out_desc.store([second, first], tl.trans(merged))
    else:
        weight = weight_desc.load([first, second])
        out_desc.store([first, second], (weight.to(tl.float32) + scale * product).to(weight.dtype))


def tma_build(weight, b, a, transposed, blocks=(128, 256, 64), warps=8, stages=3, group=8):
    """W + s·B A, or with ``transposed`` W (columns x rows) + s·(B A)ᵀ; B and A contiguous."""
    rows, columns = b.shape[0], a.shape[1]
    tile_rows, tile_columns, step = blocks
    out = torch.empty_like(weight)
    weight_block = [tile_columns, tile_rows] if transposed else [tile_rows, tile_columns]
    grid = (triton.cdiv(rows, tile_rows) * triton.cdiv(columns, tile_columns),)
    _merged_tma_kernel[grid](TensorDescriptor.from_tensor(weight, weight_block),
                             TensorDescriptor.from_tensor(b, [tile_rows, step]),
                             TensorDescriptor.from_tensor(a, [step, tile_columns]),
                             TensorDescriptor.from_tensor(out, weight_block), rows, columns, b.shape[1], SCALE,
                             BLOCK_ROWS=tile_rows, BLOCK_COLUMNS=tile_columns, BLOCK_INNER=step, GROUP_ROWS=group,
                             TRANSPOSED=transposed, num_warps=warps, num_stages=stages)
    return out


CONFIGS = (((128, 256, 64), 8, 3), ((128, 256, 64), 8, 4), ((128, 128, 64), 8, 4), ((256, 128, 64), 8, 3),
           ((128, 128, 64), 4, 4))


def probe_shape(name: str, out_dim: int, in_dim: int, count: int, totals: dict[str, float]) -> None:
    weight, left, right = factors(out_dim, in_dim)
    transposed = not left.is_contiguous()  # ΔW = Âᵀ B_flatᵀ: build ΔWᵀ = B_flat Â into W's transposed tiles
    b, a = (right.T, left.T) if transposed else (left, right)
    expected = torch.addmm(weight.float(), left.float(), right.float(), alpha=SCALE)
    flops = 2 * out_dim * in_dim * left.shape[1]
    variants = {"addmm": partial(torch.addmm, weight, left, right, alpha=SCALE),
                "mm alone": partial(torch.mm, left, right)}
    for blocks, warps, stages in CONFIGS:
        variants[f"tma {blocks} w{warps} s{stages}"] = partial(tma_build, weight, b, a, transposed, blocks, warps,
                                                               stages)
    for variant, fn in variants.items():
        try:
            us = 1e3 * milliseconds(fn, repeats=50)
        except Exception as error:  # noqa: BLE001 - a tiling that does not fit is a result too
            print(f"{name:8s} {variant:28s} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        error = (fn().float() - expected).abs().max().item() if variant.startswith("tma") else 0.0
        totals[variant] = totals.get(variant, 0.0) + us * count
        print(f"{name:8s} {variant:28s} {us:8.1f} us {flops / us / 1e6:6.0f} TFLOP/s  max error {error:.3g}")


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    totals: dict[str, float] = {}
    for layer in LAYERS:
        probe_shape(*layer, totals)
    print("builds per 1B step, ms: " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
