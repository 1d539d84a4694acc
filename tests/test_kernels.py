"""Fast paths against their plain-PyTorch definitions."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from peftlab.kernels.cross_entropy import fused_linear_cross_entropy


@pytest.mark.parametrize("divisor, softcap", [(None, None), (None, 3.0), (2.0, None)])
def test_fused_linear_cross_entropy_matches_autograd(divisor, softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,), generator=gen)
    logits = hidden @ weight.T
    if divisor:
        logits = logits / divisor
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference * 0.7, hidden)
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk=8, divisor=divisor, softcap=softcap)
    (got,) = torch.autograd.grad(fused * 0.7, hidden)
    assert torch.allclose(fused, reference, rtol=1e-9)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)


class _LogitsWatch(TorchFunctionMode):
    """Counts, at each product of the head's width, the earlier ones' results still alive."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.made, self.most_alive = vocab, [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("matmul", "__matmul__") and result.shape[-1] == self.vocab:
            self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.made))
            self.made.append(weakref.ref(result))
        return result


def test_fused_cross_entropy_holds_one_chunk_of_logits():
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    watch = _LogitsWatch(vocab=50)
    with watch:
        fused_linear_cross_entropy(hidden, weight, torch.randint(0, 50, (40,)), chunk=8)
    assert len(watch.made) == 5 and watch.most_alive == 0


def compare_triton_chunk(device: str, block: int | None = None) -> None:
    """kernels.cross_entropy_triton against the reference chunk for several dtypes and post-processings."""
    from peftlab.kernels import cross_entropy_triton
    from peftlab.kernels.cross_entropy import _chunk_loss_and_grad

    if block:
        cross_entropy_triton.BLOCK = block
    gen = torch.Generator().manual_seed(1)
    vocab = 5 * (block or cross_entropy_triton.BLOCK) // 2  # several column blocks, the last one partial
    for dtype in (torch.float32, torch.bfloat16):
        for divisor, softcap in [(None, None), (None, 3.0), (2.0, 3.0)]:
            case = (dtype, divisor, softcap)
            logits = (torch.randn(6, vocab, generator=gen) * 4).to(device, dtype)
            targets = torch.randint(0, vocab, (6,), generator=gen).to(device)
            expected_total, expected_grad = _chunk_loss_and_grad(logits.clone(), targets, divisor, softcap, True)
            total, grad = cross_entropy_triton.chunk_loss_and_grad(logits.clone(), targets, divisor, softcap, True)
            loss_only, no_grad = cross_entropy_triton.chunk_loss_and_grad(logits.clone(), targets, divisor, softcap,
                                                                          False)
            assert no_grad is None
            assert torch.allclose(total, expected_total, rtol=1e-5), case
            assert torch.allclose(loss_only, expected_total, rtol=1e-5), case
            # One rounding to the head's dtype apart (|grad| <= 1), or fp32 tanh's error (the kernel's goes by sigmoid).
            tolerance = max(torch.finfo(dtype).eps, 1e-6)
            assert grad.dtype == dtype, case
            assert torch.allclose(grad.float(), expected_grad.float(), atol=tolerance, rtol=0), case


def compare_merged_weight(device: str, dtypes: tuple[str, ...], tile: int | None = None) -> None:
    """kernels.merged_weight_triton against W + B A in fp32 rounded once, for ranks below, at and above tl.dot's
    least inner size, tiles cut at the edges, and transposed (Conv1D-like) layouts."""
    from peftlab.kernels import merged_weight_triton

    if tile:
        merged_weight_triton.TILE = tile
    gen = torch.Generator().manual_seed(2)
    edge = merged_weight_triton.TILE
    for dtype in (getattr(torch, name) for name in dtypes):
        for rows, columns, rank in [(2 * edge + 3, edge + 5, 4), (edge - 1, 3 * edge, 16), (edge + 1, edge, 80)]:
            weight, b, a = (torch.randn(shape, generator=gen).to(device, dtype)
                            for shape in [(rows, columns), (rows, rank), (rank, columns)])
            expected = torch.addmm(weight.float(), b.float(), a.float()).to(dtype)
            for layout in (lambda t: t, lambda t: t.T.contiguous().T):
                merged = merged_weight_triton.merged_weight(layout(weight), b, layout(a))
                assert merged.is_contiguous() and merged.dtype == dtype
                # the kernel's fp32 sum may differ from the reference's in the last bit, then round the other way
                ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(1)
                assert (merged.float() - expected.float()).abs().le(ulp).all(), (dtype, rows, columns, rank)


def run_triton(check: str, on_gpu: dict, on_cpu: dict) -> None:
    """Call tests.test_kernels.<check> on CUDA in this process; else under Triton's CPU interpreter, which must
    be chosen before Triton is first imported, hence a child process. Skipped where Triton is not installed
    (the dev extra installs it on Linux x86-64)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        globals()[check]("cuda", **on_gpu)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"from tests.test_kernels import {check}; {check}('cpu', **{on_cpu!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_triton_chunk_matches_reference():
    run_triton("compare_triton_chunk", on_gpu={}, on_cpu={"block": 64})


def test_triton_merged_weight_matches_reference():
    # bf16 only on CUDA: the interpreter's bf16 products are wrong (numpy has no bf16); fp32 only on the CPU,
    # where the product is exact (on CUDA fp32 weights keep cuBLAS, see kernels.merged_weight)
    run_triton("compare_merged_weight", on_gpu={"dtypes": ("bfloat16", "float16")},
               on_cpu={"dtypes": ("float32", "float16"), "tile": 32})
