"""Probe: does padding ranks to a multiple of 8 (peftlab.core.layers.RANK_ALIGNMENT) pay on the GPU?

The 1B training step, blocks compiled, of methods whose rank is not a multiple of 8 (TriAdaptLoRA's
preallocated 17, LoRA r=4 and r=17), padded and unpadded in turn in one process, against LoRA r=16. One line
per run: tokens/s, peak GiB and the step time relative to the LoRA r=16 run before it.
`python benchmarks/gpu/rank_alignment_probe.py [--steps N] [--rounds K]`."""

from __future__ import annotations

import argparse

import torch

from peftlab.bench import speed
from peftlab.core import layers

CASES = [("lora", {"r": 16, "alpha": 32.0, "dropout": 0.0}), ("triadaptlora", {}),
         ("lora", {"r": 17, "alpha": 32.0, "dropout": 0.0}), ("lora", {"r": 4, "alpha": 8.0, "dropout": 0.0})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, config = speed.build_model(args.shape, False, device)
    ids = torch.randint(0, config.vocab_size, (8, 1024) if device.type == "cuda" else (2, 16), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    reference = None
    for _ in range(args.rounds):
        for method, options in CASES:
            for alignment in (8, 1) if options != CASES[0][1] else (8,):
                layers.RANK_ALIGNMENT = alignment
                speed.OPTIONS[method] = options
                seconds, peak = speed.peftlab_run(model, method, batch, 3, args.steps, compiled=True)
                reference = seconds if options is CASES[0][1] else reference
                label = f"{method} r={options.get('r', 'default')} align {alignment}"
                print(f"{label:32s} {ids.numel() / seconds:9,.0f} tok/s  {peak or 0:5.2f} GiB  "
                      f"{seconds / reference:.3f}x LoRA r16", flush=True)
                speed._free()


if __name__ == "__main__":
    main()
