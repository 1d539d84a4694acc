"""Probe: peftlab LoRA on the 1B shape, blocks compiled, in variants of the step:

* usual: as peftlab runs it (without an activation budget, the fold keeps forward's W + s·B A for backward
  where it is no larger than the layer's input);
* rebuild: the fold builds W + s·B A again in backward, as it does under an activation budget;
* graphs: blocks replayed as CUDA graphs (SupervisedLoss's cuda_graphs), which launch a block's kernels at
  once: how much of the usual step the host's launching costs.

One line per variant: tokens/s and peak memory; "usual" runs first and last to show the drift.
`python benchmarks/gpu/step_variants_probe.py [--steps N] [--variants usual,rebuild,...]`."""

from __future__ import annotations

import argparse

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model, time_steps
from peftlab.core import layers
from peftlab.train.loss import SupervisedLoss

KEEPS_MERGED = layers.keeps_merged_weight


def run(model, batch, variant: str, steps: int) -> None:
    layers.keeps_merged_weight = (lambda weight, x: False) if variant == "rebuild" else KEEPS_MERGED
    peftlab.adapt(model, "lora", **LORA)
    loss_fn = SupervisedLoss(model, compile_body=True, cuda_graphs=variant == "graphs")

    def step():
        total, count = loss_fn(batch)
        (total / count).backward()

    try:
        seconds, peak = time_steps(step, [p for p in model.parameters() if p.requires_grad], 5, steps)
        print(f"{variant}: {batch['input_ids'].numel() / seconds:,.0f} tok/s, peak {peak:.2f} GiB", flush=True)
    except Exception as exc:  # noqa: BLE001 - the probe reports what failed and goes on
        print(f"{variant}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    finally:
        loss_fn.release()
        peftlab.delete(model, "default")
        torch._dynamo.reset()
        layers.keeps_merged_weight = KEEPS_MERGED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--variants", default="usual,rebuild,graphs,usual")
    args = parser.parse_args()
    device = torch.device("cuda")
    model, config = build_model("llama-3.2-1b", False, device)
    ids = torch.randint(0, config.vocab_size, (8, 1024), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for variant in args.variants.split(","):
        run(model, batch, variant, args.steps)


if __name__ == "__main__":
    main()
