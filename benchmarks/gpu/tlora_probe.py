"""Probe: one adapted projection's forward + backward at the Llama-3.2-1B shapes, TLoRA (the old mode-by-mode
path, the cost model's plan, optionally every plan) beside plain LoRA r=16. Prints ms per step.

    python3 benchmarks/gpu/tlora_probe.py                         # CUDA, 8192 tokens, bf16
    python3 benchmarks/gpu/tlora_probe.py --all-plans             # also every grouping, folded or not
    python3 benchmarks/gpu/tlora_probe.py --device cpu --tokens 256   # smoke test
"""
import argparse
import statistics
import time

import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.methods.tlora import TransformPlan, compositions, plan_transform

SHAPES = {"q": (2048, 2048), "k": (2048, 512), "gate": (2048, 8192), "down": (8192, 2048)}
OLD_PLAN = TransformPlan((1, 1, 1))  # one batched GEMM per mode, on the activations


def milliseconds(step, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def adapted_layer(method: str, fan_in: int, fan_out: int, device, dtype, **options):
    layer = torch.nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype)
    model = peftlab.adapt(torch.nn.Sequential(layer), method, **options)
    adapter = next(slot["default"] for _, _, slot in hosts(model))
    if method == "tlora":
        with torch.no_grad():  # away from the identity, so no GEMM sees a special matrix
            for core in adapter.transform:
                core.add_(0.01 * torch.randn_like(core))
    return model, adapter


def probe_shape(fan_in: int, fan_out: int, args, device, dtype, warmup: int) -> str:
    x = torch.randn(args.tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, fan_out, device=device, dtype=dtype)
    lora, _ = adapted_layer("lora", fan_in, fan_out, device, dtype, r=16, alpha=32.0, dropout=0.0)
    base = milliseconds(lambda: lora(x).backward(grad), device, warmup, args.reps)
    tlora, adapter = adapted_layer("tlora", fan_in, fan_out, device, dtype)
    shape = tuple(core.shape[0] for core in adapter.transform)
    plans = {"old": OLD_PLAN, "new": None}
    if args.all_plans:
        plans |= {f"{'fold' if folded else 'tok'}{groups}": TransformPlan(groups, folded)
                  for groups in compositions(len(shape)) for folded in (False, True)}
    cells = [f"lora16 {base:7.3f}"]
    for label, plan in plans.items():
        adapter.plan_override = plan
        ms = milliseconds(lambda: tlora(x).backward(grad), device, warmup, args.reps)
        cells.append(f"{label} {ms:7.3f} ({ms / base:4.2f}x)")
    return f"{shape} plan {plan_transform(args.tokens, fan_out, shape, True, device.type)}: " + " | ".join(cells)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU unless given")
    parser.add_argument("--all-plans", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    warmup = 5 if device.type == "cuda" else 2
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {args.tokens} tokens, {dtype}, "
          f"ms per forward + backward (x needs its gradient)")
    for name, (fan_in, fan_out) in SHAPES.items():
        print(f"{name:4s} {fan_in}->{fan_out} " + probe_shape(fan_in, fan_out, args, device, dtype, warmup), flush=True)


if __name__ == "__main__":
    main()
