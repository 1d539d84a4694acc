"""What is on the GPU at the peaks of one peftlab training step's forward (loss included) and backward (optimizer
step included): the live allocations made during the step, largest first, each with the innermost frames of
peftlab, transformers or torch that made it.

    python3 benchmarks/gpu/memory_peak.py llama-3.1-8b --batch 4 --seq 2048 --checkpointing --compile --offload
"""

from __future__ import annotations

import argparse
import linecache

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model
from peftlab.train.loss import SupervisedLoss

BACKWARD_MARK_BYTES = 3 << 20  # an allocation of this size, made by backward_mark(), separates the phases


def backward_mark() -> torch.Tensor:
    return torch.empty(BACKWARD_MARK_BYTES, dtype=torch.uint8, device="cuda")


def step_trace(args) -> tuple[list[dict], float]:
    model, config = build_model(args.shape, args.checkpointing, torch.device("cuda"))
    peftlab.adapt(model, "lora", **LORA)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn = SupervisedLoss(model, compile_body=args.compile, offload_activations=args.offload)
    if args.offload and args.prefetch_mib is not None:
        loss_fn.offload.prefetch_bytes = args.prefetch_mib << 20
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)

    def step():
        total, count = loss_fn(batch)
        backward_mark()
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # compiled, optimizer state allocated
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() / 2**30
    torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=500_000)
    step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    return trace, before


def phase_peaks(trace: list[dict]) -> dict[str, tuple[int, int, dict]]:
    """For forward and backward: (bytes above the step's start at the phase's peak, event index, live
    allocations there)."""
    live, current, phase, peaks = {}, 0, "forward", {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            if phase == "forward" and event["size"] == BACKWARD_MARK_BYTES and marked(event):
                phase = "backward"
            live[event["addr"]] = event
            current += event["size"]
            if current > peaks.get(phase, (-1,))[0]:
                peaks[phase] = (current, index, dict(live))
        elif event["action"] == "free_requested":
            current -= event["size"]
            live.pop(event["addr"], None)
    return peaks


def marked(event: dict) -> bool:
    return any(frame["name"] == backward_mark.__name__ for frame in event.get("frames", []))


def where(event: dict, depth: int) -> str:
    """The innermost source line (compiled code included), then the frames of peftlab and transformers."""
    frames = event.get("frames", [])
    first = linecache.getline(frames[0]["filename"], frames[0]["line"]).strip()[:70] if frames else "?"
    keep = [f for f in frames if any(k in f["filename"] for k in ("peftlab", "transformers"))]
    return first + "  |  " + " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
                                        for f in keep[:depth])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--prefetch-mib", type=int, help="offload: what backward brings back ahead")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    trace, before = step_trace(args)
    print(f"start of step {before:.3f} GiB, {len(trace)} events")
    for phase, (peak, at, live) in phase_peaks(trace).items():
        print(f"{phase} peak +{peak / 2**30:.3f} GiB at event {at}")
        for event in sorted(live.values(), key=lambda e: -e["size"])[:args.rows]:
            print(f"{event['size'] / 2**20:9.1f} MiB  {where(event, 4)}")


if __name__ == "__main__":
    main()
