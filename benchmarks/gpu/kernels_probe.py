"""Probe: peftlab's Triton kernels against what they replace, on the 1B shape's sizes.

- One chunk of the fused head + cross-entropy (4096 x 128256 bf16 logits): the reference compiled (the path
  before kernels.cross_entropy_triton) against the kernel at several column blocks and warp counts.
- The fold's merged weight W + B A (r 16, bf16) for the 1B shape's layer sizes: torch.addmm against
  kernels.merged_weight_triton.

Prints ms per call, the memory rate and the largest difference to the reference.

    python3 benchmarks/gpu/kernels_probe.py 4096:16 8192:16 2048:8
"""

import sys

import torch

from peftlab.kernels import cross_entropy_triton, merged_weight_triton
from peftlab.kernels.cross_entropy import _chunk_loss_and_grad


def milliseconds(function, *args, repeats: int = 20) -> float:
    for _ in range(2):  # warm-up, compilation
        function(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function(*args)  # the chunk's gradient overwrites its logits: the values drift, the work does not
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def cross_entropy(configs: list[str]) -> None:
    logits = (torch.randn(4096, 128256, device="cuda") * 3).bfloat16()
    targets = torch.randint(0, 128256, (4096,), device="cuda")
    compiled = torch.compile(_chunk_loss_and_grad, dynamic=True)
    total, grad = compiled(logits.clone(), targets, None, None, True)
    ms = milliseconds(compiled, logits.clone(), targets, None, None, True)
    print(f"cross-entropy chunk, compiled reference: {ms:.3f} ms", flush=True)
    gib = 3 * logits.numel() * logits.element_size() / 2**30
    for config in configs:
        block, warps = map(int, config.split(":"))
        cross_entropy_triton.BLOCK, cross_entropy_triton.WARPS = block, warps
        ours_total, ours_grad = cross_entropy_triton.chunk_loss_and_grad(logits.clone(), targets, None, None, True)
        ms = milliseconds(cross_entropy_triton.chunk_loss_and_grad, logits.clone(), targets, None, None, True)
        print(f"  triton block {block} warps {warps}: {ms:.3f} ms ({gib / ms * 1e3:,.0f} GiB/s for 2 reads + 1 write), "
              f"loss rel. diff {abs(ours_total / total - 1).item():.2e}, "
              f"grad max diff {(ours_grad.float() - grad.float()).abs().max().item():.2e}", flush=True)


def merged_weight() -> None:
    for rows, columns in [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]:
        weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(rows, 16, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, columns, device="cuda", dtype=torch.bfloat16)
        reference, ours = torch.addmm(weight, b, a), merged_weight_triton.merged_weight(weight, b, a)
        cublas = milliseconds(torch.addmm, weight, b, a)
        triton = milliseconds(merged_weight_triton.merged_weight, weight, b, a)
        gib = 2 * weight.numel() * weight.element_size() / 2**30
        print(f"merged weight {rows} x {columns}: addmm {cublas * 1e3:.1f} us, triton {triton * 1e3:.1f} us "
              f"({gib / triton * 1e3:,.0f} GiB/s for 1 read + 1 write), "
              f"max diff {(ours.float() - reference.float()).abs().max().item():.2e}", flush=True)


if __name__ == "__main__":
    merged_weight()
    cross_entropy(sys.argv[1:] or ["4096:16", "8192:16", "4096:8"])
