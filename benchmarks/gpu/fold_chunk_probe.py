"""Probe: LoRA on the 1B shape, blocks compiled, the fold as an opaque operator (rebuilds W + s·B A in backward),
traced through (the compiler keeps forward's merged weight) or traced with backward's merge built transposed
(Wᵀ + AᵀBᵀ: not the same graph node as forward's, so nothing weight-sized is kept), at several cross-entropy
chunk sizes: does a
smaller chunk's lower peak make room for the merged copy, or does an activation budget below 1 make the
partitioner recompute the merged weight instead of keeping it? Prints tok/s and peak GiB per variant
(fold:chunk[:budget]).

    python3 benchmarks/gpu/fold_chunk_probe.py opaque:4096 traced:1024 traced:4096:0.9 transposed:4096
"""

import gc
import sys

import torch

import peftlab
from peftlab.bench.speed import LORA, build_model, time_steps
from peftlab.core import layers
from peftlab.train.loss import SupervisedLoss


class TransposedMergeFold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b):
        ctx.save_for_backward(x, weight, a, b)
        return torch.nn.functional.linear(x, torch.addmm(weight, b, a), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b = ctx.saved_tensors
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad @ torch.addmm(weight.t(), a.t(), b.t()).t()
        return grad_x, None, None, (flat_grad @ b).T @ flat_x, flat_grad.T @ (flat_x @ a.T)


FOLDS = {"traced": layers._FoldedLowRank.apply, "transposed": TransposedMergeFold.apply}


def probe(model, batch, fold: str, chunk: int, budget: float | None, opaque) -> str:
    layers._folded_low_rank_op = FOLDS.get(fold, opaque)
    peftlab.adapt(model, "lora", **LORA)
    loss_fn = SupervisedLoss(model, chunk_tokens=chunk, compile_body=True, activation_budget=budget)

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
    tokens_per_second = batch["input_ids"].numel() / seconds
    return f"{fold} chunk {chunk} budget {budget}: {tokens_per_second:,.0f} tok/s, peak {peak:.2f} GiB"


def main(variants: list[str]) -> None:
    model, config = build_model("llama-3.2-1b", False, torch.device("cuda"))
    ids = torch.randint(0, config.vocab_size, (8, 1024), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opaque = layers._folded_low_rank_op
    for variant in variants:
        fold, chunk, *budget = variant.split(":")
        print(probe(model, batch, fold, int(chunk), float(budget[0]) if budget else None, opaque), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["opaque:4096", "traced:1024"])
