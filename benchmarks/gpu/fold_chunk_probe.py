"""Probe: LoRA on the 1B shape, blocks compiled, the fold as an opaque operator (rebuilds W + s·B A in backward)
or traced through (the compiler keeps forward's merged weight), at several cross-entropy chunk sizes: does a
smaller chunk's lower peak make room for the merged copy? Prints tok/s and peak GiB per variant.

    python3 benchmarks/gpu/fold_chunk_probe.py opaque:4096 traced:1024 traced:2048
"""

import gc
import sys

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model, time_steps
from peftlab.core import layers
from peftlab.train.loss import SupervisedLoss


def probe(model, batch, fold: str, chunk: int, opaque) -> str:
    layers._folded_low_rank_op = opaque if fold == "opaque" else layers._FoldedLowRank.apply
    peftlab.adapt(model, "lora", **LORA)
    loss_fn = SupervisedLoss(model, chunk_tokens=chunk, compile_body=True)

    def step():
        total, count = loss_fn(batch)
        (total / count).backward()

    try:
        seconds, peak = time_steps(step, [p for p in model.parameters() if p.requires_grad], 3, 10)
    finally:
        loss_fn.release()
        peftlab.delete(model, "default")
        torch._dynamo.reset()
        layers._folded_low_rank_op = opaque
        gc.collect()
        torch.cuda.empty_cache()
    return f"{fold} chunk {chunk}: {batch['input_ids'].numel() / seconds:,.0f} tok/s, peak {peak:.2f} GiB"


def main(variants: list[str]) -> None:
    model, config = build_model("llama-3.2-1b", False, torch.device("cuda"))
    ids = torch.randint(0, config.vocab_size, (8, 1024), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opaque = layers._folded_low_rank_op
    for variant in variants:
        fold, chunk = variant.split(":")
        print(probe(model, batch, fold, int(chunk), opaque), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["opaque:4096", "traced:1024"])
