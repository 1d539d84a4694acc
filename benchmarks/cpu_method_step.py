"""CPU proxy of an adapter's training-step cost: one adapted linear layer, forward + backward.

    python benchmarks/cpu_method_step.py --methods soka,wara --dtypes float32,bfloat16

For every (in -> out) shape and dtype, one frozen ``nn.Linear`` in that dtype gets the method with its
default options (LoRA and RandLoRA as ``peftlab.bench.speed`` configures them); adapter parameters stay
fp32 master weights, as in training. A batch of ``tokens`` inputs that requires grad (it comes from an
earlier layer in a real model) goes forward, then backward with a fixed random output gradient. Method
and LoRA steps alternate (the machine may be shared); the median wall time over ``repeats`` steps of
each is reported, and the ratio method / LoRA.

This is a proxy for the GPU numbers, not a substitute: a CPU has no launch overhead and different
matmul/elementwise speed ratios, but avoidable dense rebuilds, gathers, fp32 copies of activations and
einsum intermediates show up on both. The ``ops`` column covers what the CPU hides: the ATen operations
one step dispatches (forward and backward, views excluded), each about one kernel launch on a GPU. In
eager mode on the 1B shape every adapted layer's launches add up (112 layers, a few µs each), and the
zoo's eager step times tracked this count (benchmarks/results/speed-2026-11-25.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.bench.speed import OPTIONS

SLOW_FAMILIES = ("soka", "wara", "tlora", "salt", "loca", "diffora", "svft", "randlora", "sorsa", "triadaptlora")
SHAPES = ((2048, 8192), (2048, 2048))


class OneLayer(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out, bias=False, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def build_step(method: str, fan_in: int, fan_out: int, dtype: torch.dtype, tokens: int):
    """A closure running forward + backward through one freshly adapted layer."""
    torch.manual_seed(0)
    model = peftlab.adapt(OneLayer(fan_in, fan_out, dtype), method, **OPTIONS.get(method, {}))
    model.train()
    x = torch.randn(tokens, fan_in, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, fan_out, dtype=dtype)

    def step() -> None:
        model(x).backward(grad_out)
        x.grad = None
        model.zero_grad(set_to_none=True)

    return step


_FREE = {torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default,  # no kernel behind these
         torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that do work (views and metadata changes excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (torch.Tag.view_copy in func.tags or func.is_view or func in _FREE):
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_ops(method: str, fan_in: int, fan_out: int, dtype: torch.dtype, tokens: int) -> int:
    """ATen operations of one training step of ``method`` (after a warm-up step: lazy caches are built)."""
    step = build_step(method, fan_in, fan_out, dtype, tokens)
    step()
    with _OpCounter() as counter:
        step()
    return counter.count


def paired_ms(method: str, fan_in: int, fan_out: int, dtype: torch.dtype, tokens: int,
              repeats: int) -> tuple[float, float]:
    """Median milliseconds of (method, LoRA) steps, alternated so that load from other processes on a
    shared machine hits both alike; one warm-up step each."""
    steps = {name: build_step(name, fan_in, fan_out, dtype, tokens) for name in (method, "lora")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i:
                times[name].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[method]), statistics.median(times["lora"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(SLOW_FAMILIES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES), help="INxOUT,...")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"{'method':<14}{'shape':>12}{'dtype':>10}{'ms':>10}{'lora ms':>10}{'ratio':>8}{'ops':>6}{'lora':>6}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for fan_in, fan_out in shapes:
            for method in args.methods.split(","):
                ms, lora = paired_ms(method, fan_in, fan_out, dtype, args.tokens, args.repeats)
                ops, lora_ops = (step_ops(m, fan_in, fan_out, dtype, 16) for m in (method, "lora"))
                print(f"{method:<14}{f'{fan_in}x{fan_out}':>12}{dtype_name:>10}{ms:>10.1f}{lora:>10.1f}"
                      f"{ms / lora:>8.2f}{ops:>6}{lora_ops:>6}", flush=True)


if __name__ == "__main__":
    main()
