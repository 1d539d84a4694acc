"""Where a peftlab training step spends GPU time: `python benchmarks/gpu/profile_step.py lora [--shape S] ...`.

Times the same steps as peftlab.bench.speed (blocks compiled unless --eager), then profiles two steps and
prints the step's wall time beside the GPU's busy time; the kernel time per step split into products
(GEMMs), attention, compiled (Triton) kernels and the rest; the products' time split into low-rank ones
(a dimension <= --rank-max) and those of the model's own size; and the longest kernels, products and
copies (the last two with their input shapes); and where the GPU sat idle: its gaps summed by the step's
phase (forward with the loss, backward, optimizer) and by the operator that launched the kernel ending each gap,
i.e. what the CPU was doing while the GPU waited; and which operators launched the memory copies and fills.
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import peftlab
from peftlab.bench.speed import OPTIONS, build_model, time_steps
from peftlab.methods import lora
from peftlab.train.loss import SupervisedLoss

COPIES = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::index", "aten::index_put_")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
PHASES = ("forward", "backward", "optimizer")
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")


def gpu_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def is_kernel(event) -> bool:
    """A kernel on the GPU's timeline; not torch.compile's "## Call CompiledFxGraph" annotations, which span
    their graphs' kernels and would count them twice."""
    return getattr(event, "device_type", None) == DeviceType.CUDA and not event.key.startswith("## ")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention"
    if any(key in lowered for key in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "products"
    return "compiled kernels" if lowered.startswith("triton") else "other"


def product_kind(event, rank_max: int) -> str:
    dims = [d for shape in event.input_shapes for d in shape if isinstance(d, int)]
    return "low-rank" if dims and min(dims) <= rank_max else "model-size"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--rank-max", type=int, default=64)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--unfolded", action="store_true", help="LoRA keeps its separate low-rank products")
    args = parser.parse_args()
    if args.unfolded:
        lora.folds_low_rank = lambda layer, x: False
    device = torch.device("cuda")
    model, config = build_model(args.shape, args.checkpointing, device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    peftlab.adapt(model, peftlab.method_class(args.method)(**OPTIONS.get(args.method, {})))
    loss_fn = SupervisedLoss(model, compile_body=not args.eager)

    def step():
        total, count = loss_fn(batch)
        (total / count).backward()

    params = [p for p in model.parameters() if p.requires_grad]
    seconds, peak = time_steps(step, params, 3, 6)
    print(f"{args.shape} {args.method}: {args.batch * args.seq / seconds:,.0f} tok/s, {seconds * 1e3:.1f} ms/step, "
          f"peak {peak:.2f} GiB", flush=True)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(2):
            phased_step(loss_fn, batch, optimizer)
        torch.cuda.synchronize()
        profiled_ms = (time.perf_counter() - start) / 2 * 1e3
    events = sorted((e for e in prof.key_averages(group_by_input_shape=True) if gpu_us(e) > 0),
                    key=gpu_us, reverse=True)
    kernels = [e for e in events if is_kernel(e)]
    products = [e for e in events if not is_kernel(e) and e.key in PRODUCTS]
    copies = [e for e in events if not is_kernel(e) and e.key in COPIES]
    print(f"profiled step {profiled_ms:.1f} ms, of it GPU busy {sum(map(gpu_us, kernels)) / 2e3:.1f} ms")
    print_split("kernel time per step", kernels, lambda e: kernel_kind(e.key))
    print_split("products", products, lambda e: product_kind(e, args.rank_max))
    for title, rows in (("kernels", kernels), ("products by shape", products), ("copies by shape", copies)):
        print(f"-- {title}, longest first (ms per step, calls per step)")
        for e in rows[:args.rows]:
            shapes = str([s for s in e.input_shapes if s])[:80]
            print(f"{gpu_us(e) / 2e3:8.2f} ms {e.count // 2:5d}x  {e.key[:70]:70s} {shapes}")
    print_gaps(prof, args.rows)


def phased_step(loss_fn, batch, optimizer) -> None:
    """One training step, its phases marked for the gap report."""
    with record_function("forward"):
        total, count = loss_fn(batch)
    with record_function("backward"):
        (total / count).backward()
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def print_gaps(prof, rows: int) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        prof.export_chrome_trace(file.name)
        trace = json.load(open(file.name))
    timeline = Timeline(trace)
    gaps = timeline.idle_gaps()
    print(f"-- GPU idle: {sum(g for g, _, _ in gaps) / 2e3:.1f} ms per step in {len(gaps) // 2} gaps over 5 us")
    print_totals("idle by phase", [(g, phase) for g, phase, _ in gaps], rows)
    print_totals("idle by launching operators", [(g, op) for g, _, op in gaps], rows)
    print_totals("memory copies and fills by launching operators",
                 [(e["dur"], timeline.launching_ops(e)) for e in timeline.gpu if e.get("cat") != "kernel"], rows)


def print_totals(title: str, items: list[tuple[float, str]], rows: int) -> None:
    totals, counts = defaultdict(float), defaultdict(int)
    for us, name in items:
        totals[name] += us
        counts[name] += 1
    print(f"-- {title} (ms per step, times per step)")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"{us / 2e3:8.2f} ms {counts[name] // 2:5d}x  {name[:100]}")


class Timeline:
    """A chrome trace's GPU events in time order, each traceable to the CPU operators that launched it."""

    def __init__(self, trace: dict):
        events = trace["traceEvents"]
        self.gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
        self.launches = {e["args"]["correlation"]: e for e in events
                         if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        by_thread = defaultdict(list)
        for e in events:
            if e.get("cat") == "cpu_op" and "dur" in e:
                by_thread[e["tid"]].append(e)
        self.ops = {tid: ([e["ts"] for e in found], found)
                    for tid, found in ((tid, sorted(found, key=lambda e: e["ts"])) for tid, found in by_thread.items())}
        self.phases = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") in PHASES]

    def idle_gaps(self, min_us: float = 5.0) -> list[tuple[float, str, str]]:
        """The GPU's idle gaps as (µs, phase, operators): the phase and the innermost CPU operators at the launch
        of the kernel that ended the gap."""
        gaps, busy_until = [], None
        for event in self.gpu:
            if busy_until is not None and event["ts"] - busy_until > min_us:
                gaps.append((event["ts"] - busy_until, self.launching_phase(event), self.launching_ops(event)))
            end = event["ts"] + event["dur"]
            busy_until = end if busy_until is None else max(busy_until, end)
        return gaps

    def launch(self, event) -> dict | None:
        return self.launches.get(event.get("args", {}).get("correlation"))

    def launching_phase(self, event) -> str:
        launch = self.launch(event)
        if launch is None:
            return "(launch not traced)"
        return next((p["name"] for p in self.phases if p["ts"] <= launch["ts"] <= p["ts"] + p["dur"]),
                    "(between phases)")

    def launching_ops(self, event, depth: int = 3) -> str:
        """The innermost ``depth`` operators on the launching thread that span the launch, innermost first."""
        launch = self.launch(event)
        if launch is None:
            return "(launch not traced)"
        starts, thread_ops = self.ops.get(launch["tid"], ([], []))
        index = bisect.bisect_right(starts, launch["ts"])
        spanning = [op["name"] for op in reversed(thread_ops[max(0, index - 256):index])
                    if op["ts"] + op["dur"] >= launch["ts"]]
        return " < ".join(spanning[:depth]) or "(no operator)"


def print_split(title: str, events, classify) -> None:
    total, classes = 0.0, {}
    for e in events:
        total += gpu_us(e)
        classes[classify(e)] = classes.get(classify(e), 0.0) + gpu_us(e)
    print(f"{title}: {total / 2e3:.1f} ms: " + ", ".join(
        f"{name} {us / 2e3:.1f} ms ({us / max(total, 1e-9):.0%})"
        for name, us in sorted(classes.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
