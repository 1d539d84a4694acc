"""The merged weight W + B A of a frozen layer and a low-rank update (core.layers' fold builds it in
forward and again in backward).

For half-precision weights on CUDA a Triton kernel (kernels.merged_weight_triton) writes the sum in
one pass over W, half the memory traffic of torch.addmm, which copies W into its result before the
product adds to it; the reference, ``torch.addmm(W, B, A)``, runs elsewhere. An operator opaque to
torch.compile, so compiled code calls the kernel too.
"""

from __future__ import annotations

import torch


def _merged_kernel_or_none(weight: torch.Tensor, rank: int):
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        return None  # fp32 stays with cuBLAS: Triton's dot would round the factors to TF32
    try:
        from peftlab.kernels import merged_weight_triton
    except ImportError:  # CUDA without Triton (not a torch wheel for Linux)
        return None
    return merged_weight_triton.merged_weight if rank <= merged_weight_triton.MAX_RANK else None


def merged_weight_direct(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``merged_weight`` without the operator's dispatch (about 10 µs a call on a CPU): for callers that
    torch.compile never traces, such as the fold's own opaque operator."""
    kernel = _merged_kernel_or_none(weight, a.shape[0])
    return torch.addmm(weight, b, a) if kernel is None else kernel(weight, b, a)


@torch.library.custom_op("peftlab::merged_weight", mutates_args=())
def merged_weight(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """W + B A for W (out x in), B (out x r) and A (r x in) of one dtype."""
    return merged_weight_direct(weight, b, a)


@merged_weight.register_fake
def _(weight, b, a):
    return weight.new_empty(weight.shape)
