"""Probe: peftlab LoRA on the 1B shape with its blocks compiled as usual, then as CUDA graphs
(torch.compile mode "reduce-overhead"), which launch a block's kernels at once instead of one by one from
the host. One line per variant: tokens/s and peak memory; the graphs' line says whether the host's
launching, not the GPU, bounds the usual step. `python benchmarks/gpu/cudagraph_probe.py [--steps N]`."""

from __future__ import annotations

import argparse

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model, time_steps
from peftlab.train.loss import SupervisedLoss


def run(model, batch, graphs: bool, steps: int) -> None:
    peftlab.adapt(model, "lora", **LORA)
    loss_fn = SupervisedLoss(model, compile_body=True)
    if graphs:
        for block in loss_fn.compiled:
            block.module.compile(mode="reduce-overhead")

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        total, count = loss_fn(batch)
        (total / count).backward()

    try:
        seconds, peak = time_steps(step, [p for p in model.parameters() if p.requires_grad], 5, steps)
        print(f"{'graphs' if graphs else 'usual'}: {batch['input_ids'].numel() / seconds:,.0f} tok/s, "
              f"peak {peak:.2f} GiB", flush=True)
    except Exception as exc:  # noqa: BLE001 - the probe reports what failed and goes on
        print(f"{'graphs' if graphs else 'usual'}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    finally:
        loss_fn.release()
        peftlab.delete(model, "default")
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    device = torch.device("cuda")
    model, config = build_model("llama-3.2-1b", False, device)
    ids = torch.randint(0, config.vocab_size, (8, 1024), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for graphs in (False, True, False):
        run(model, batch, graphs, args.steps)


if __name__ == "__main__":
    main()
