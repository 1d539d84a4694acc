"""Probe: how fast RandLoRA's three weight-sized products run on the 1B shape's layers, one variant at a time.

A RandLoRA step builds W + s·ΔW (ΔW = B_flat·Â, an addmm), takes ΔW's gradient gᵀx and projects it onto Â
(B_flatᵀ·G). The profile showed the build at about 590 TFLOP/s where plain products of the same size ran at
720 to 790: this times the build as the adapter runs it beside a plain product of the same shape and its
alternatives (scale folded into Â, the transposed layout, a Triton GEMM whose epilogue adds W, in several
tilings), plus the gradient and projection products, and prints µs and TFLOP/s per layer shape.

    python3 benchmarks/gpu/randlora_build_probe.py
"""

from functools import partial

import torch
import triton
import triton.language as tl
from kernels_probe import milliseconds

TOKENS = 8192
SCALE = 20.0
# (name, out, in, layers per 1B step): ΔW's factors as the adapter builds them (randlora.delta_factors)
# H100 80GB, torch 2.11 (builds per 1B step): addmm 7.62 ms, mm alone 5.67 ms, the best Triton tiling
# (128, 256, 64) 7.36 ms, slower than addmm on k/v; the default (128, 128, 64) 8.43 ms
TRITON_CONFIGS = (((128, 128, 64), 8, 4), ((128, 256, 64), 8, 3), ((256, 128, 64), 8, 3), ((128, 128, 64), 4, 4),
                  ((128, 128, 128), 8, 3), ((64, 128, 64), 4, 4))
LAYERS = (("gate/up", 8192, 2048, 32), ("down", 2048, 8192, 16), ("q/o", 2048, 2048, 32), ("k/v", 512, 2048, 32))


def factors(out_dim: int, in_dim: int):
    """(W, left, right) with ΔW = left·right as RandLoRAAdapter.delta_factors lays them out."""
    m, big = min(out_dim, in_dim), max(out_dim, in_dim)
    k = m  # r·n = m on these shapes
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    weight = torch.randn(out_dim, in_dim, **kw)
    scaled, b_flat = torch.randn(k, m, **kw), torch.randn(big, k, **kw)
    left, right = (b_flat, scaled) if m == in_dim else (scaled.T, b_flat.T)
    return weight, left, right


@triton.jit
def _merged_product_kernel(weight_ptr, b_ptr, a_ptr, out_ptr, rows, columns, inner, scale,
                           weight_row_stride, weight_column_stride, b_row_stride, b_column_stride,
                           a_row_stride, a_column_stride,
                           BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCK_INNER: tl.constexpr,
                           GROUP_ROWS: tl.constexpr):
    # programs walk the tiles in groups of GROUP_ROWS tile rows, so that neighbours share B's and A's tiles in L2
    program = tl.program_id(0)
    tile_rows, tile_columns = tl.cdiv(rows, BLOCK_ROWS), tl.cdiv(columns, BLOCK_COLUMNS)
    group_width = GROUP_ROWS * tile_columns
    first_row = (program // group_width) * GROUP_ROWS
    group_rows = min(tile_rows - first_row, GROUP_ROWS)
    tile_row = first_row + (program % group_width) % group_rows
    tile_column = (program % group_width) // group_rows
    row = tile_row.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tile_column * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    k = tl.arange(0, BLOCK_INNER)
    product = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    for start in range(0, inner, BLOCK_INNER):
        b = tl.load(b_ptr + row[:, None] * b_row_stride + (start + k)[None, :] * b_column_stride,
                    mask=(row[:, None] < rows) & ((start + k)[None, :] < inner), other=0.0)
        a = tl.load(a_ptr + (start + k)[:, None] * a_row_stride + column[None, :] * a_column_stride,
                    mask=((start + k)[:, None] < inner) & (column[None, :] < columns), other=0.0)
        product = tl.dot(b, a, product)
    inside = (row[:, None] < rows) & (column[None, :] < columns)
    weight = tl.load(weight_ptr + row[:, None] * weight_row_stride + column[None, :] * weight_column_stride,
                     mask=inside, other=0.0)
    merged = weight.to(tl.float32) + scale * product
    tl.store(out_ptr + row[:, None] * columns + column[None, :], merged.to(out_ptr.dtype.element_ty), mask=inside)


def triton_build(weight, left, right, blocks=(128, 256, 64), warps=8, stages=3, group=8):
    """W + s·left·right in one Triton GEMM whose epilogue adds W: no copy of W, as addmm makes."""
    rows, columns = weight.shape
    out = torch.empty(rows, columns, dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(rows, blocks[0]) * triton.cdiv(columns, blocks[1]),)
    _merged_product_kernel[grid](weight, left, right, out, rows, columns, right.shape[0], SCALE, *weight.stride(),
                                 *left.stride(), *right.stride(), BLOCK_ROWS=blocks[0], BLOCK_COLUMNS=blocks[1],
                                 BLOCK_INNER=blocks[2], GROUP_ROWS=group, num_warps=warps, num_stages=stages)
    return out


def build_variants(weight, left, right):
    weight_t = weight.T.contiguous()
    return {
        "addmm (as now)": lambda: torch.addmm(weight, left, right, alpha=SCALE),
        "addmm alpha=1": lambda: torch.addmm(weight, left, right),
        "mm alone": lambda: torch.mm(left, right),
        "addmm transposed": lambda: torch.addmm(weight_t, right.T, left.T, alpha=SCALE),
        "mm + add_": lambda: torch.mm(left, right).mul_(SCALE).add_(weight),
        **{f"triton {blocks} w{warps} s{stages}": partial(triton_build, weight, left, right, blocks, warps, stages)
           for blocks, warps, stages in TRITON_CONFIGS},
    }


def gradient_products(out_dim: int, in_dim: int, left, right) -> None:
    """gᵀx and its projection onto the trained factor, as one layer's backward runs them."""
    grad = torch.randn(TOKENS, out_dim, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(TOKENS, in_dim, device="cuda", dtype=torch.bfloat16)
    g_weight = grad.T @ x
    flops = {"gᵀx": 2 * TOKENS * out_dim * in_dim, "projection": 2 * out_dim * in_dim * left.shape[1]}
    trained_right = min(out_dim, in_dim) == in_dim
    products = {"gᵀx": lambda: grad.T @ x,
                "projection": (lambda: left.T @ g_weight) if trained_right else (lambda: g_weight @ right.T)}
    for product, fn in products.items():
        us = 1e3 * milliseconds(fn, repeats=50)
        print(f"{'':8s} {product:26s} {us:8.1f} us {flops[product] / us / 1e6:6.0f} TFLOP/s")


def check_triton() -> None:
    for name, out_dim, in_dim, _ in LAYERS:
        weight, left, right = factors(out_dim, in_dim)
        expected = torch.addmm(weight.float(), left.float(), right.float(), alpha=SCALE)
        error = (triton_build(weight, left, right).float() - expected).abs().max().item()
        print(f"{name}: triton max error {error:.3g} (|W + sΔW| max {expected.abs().max().item():.3g})")


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    totals: dict[str, float] = {}
    for name, out_dim, in_dim, count in LAYERS:
        weight, left, right = factors(out_dim, in_dim)
        build_flops = 2 * out_dim * in_dim * left.shape[1]
        for variant, fn in build_variants(weight, left, right).items():
            us = 1e3 * milliseconds(fn, repeats=50)
            totals[variant] = totals.get(variant, 0.0) + us * count
            print(f"{name:8s} build {variant:20s} {us:8.1f} us {build_flops / us / 1e6:6.0f} TFLOP/s")
        gradient_products(out_dim, in_dim, left, right)
    check_triton()
    print("builds per 1B step, ms: " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
