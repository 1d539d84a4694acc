"""Adapter training steps on one process or several (data-parallel, optionally with the frozen blocks
sharded by FSDP2), on the same data: the losses must agree and the tokens/s should scale.

    python -m benchmarks.distributed_step --shape llama-3.2-1b --micro 8 --seq 1024 --global-micro 2
    torchrun --nproc_per_node 2 -m benchmarks.distributed_step --shape llama-3.2-1b --micro 8 --seq 1024 \
        --global-micro 2 [--shard]

Every optimizer step trains on ``--global-micro`` micro-batches of ``--micro`` random sequences; micro-batch
i of step s is drawn from seed (s, i) and dealt to rank i mod world_size, so any number of processes sees
the same global batch. The trainer's arithmetic is used: each micro-batch's token loss is divided by the
global token count, the adapter gradients are summed over ranks (peftlab.train.distributed), AdamW steps.
Rank 0 prints one JSON row (and appends it to ``--output``): world size, sharding, global tokens/s over
the timed steps, the per-step losses, and the peak GiB of the busiest rank. The base is random (seed 0 on
every rank) and built as ``peftlab bench speed`` builds it (bf16, SDPA), with LoRA r 16 on all seven
projections. ``--shape tiny-llama --device cpu`` checks the script on CPU (gloo under torchrun).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model
from peftlab.train import distributed
from peftlab.train.loss import SupervisedLoss


def build(shape: str, checkpointing: bool, device: torch.device):
    torch.manual_seed(0)  # the same base on every rank
    model, config = build_model(shape, checkpointing, device)  # the speed benchmark's: bf16, SDPA, frozen
    peftlab.adapt(model, "lora", **LORA)
    return model, config


def micro_batch(step: int, index: int, size: int, seq: int, vocab: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(step * 100_003 + index)
    ids = torch.randint(0, vocab, (size, seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(args: argparse.Namespace) -> dict:
    job = distributed.from_environment()
    device = job.device if job.enabled else torch.device(args.device)
    model, config = build(args.shape, args.checkpointing, device)
    params = [p for p in model.parameters() if p.requires_grad]
    job.broadcast_parameters(params)
    if args.shard and job.enabled:
        distributed.shard_frozen_base(model, job)
    loss_fn = SupervisedLoss(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    global_tokens = args.global_micro * args.micro * (args.seq - 1)
    losses, started = [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
        step_loss = 0.0
        for index in range(args.global_micro):
            if not job.owns(index):
                continue
            with autocast:
                total, _ = loss_fn(micro_batch(step, index, args.micro, args.seq, config.vocab_size, device))
            (total / global_tokens).backward()
            step_loss += total.item() / global_tokens
        job.reduce_gradients(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(job.sum([step_loss])[0])
    _sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"shape": args.shape, "world_size": job.world_size,
            "shard": bool(args.shard and job.enabled), "checkpointing": args.checkpointing, "micro": args.micro,
            "seq": args.seq, "global_micro": args.global_micro,
            "tok_s": round(args.steps * args.global_micro * args.micro * args.seq / seconds, 1),
            "peak_gib": round(max(job.gather(peak)), 2), "losses": [round(x, 6) for x in losses],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--global-micro", type=int, default=2, help="micro-batches per optimizer step, all ranks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--shard", action="store_true", help="FSDP2 over the frozen blocks (under torchrun)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="append the row to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.global_micro % distributed.environment_world_size():
        parser.error(f"--global-micro {args.global_micro} must be a multiple of the number of processes")
    row = run(args)
    if distributed.from_environment().is_main:
        print(json.dumps(row), flush=True)
        if args.output:
            with Path(args.output).open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
