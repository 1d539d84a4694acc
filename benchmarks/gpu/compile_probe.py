"""Probe: eager vs torch.compile (whole body / per decoder layer) for peftlab LoRA on the 1B shape,
plus a kernel-time profile of the eager step. Prints one line per variant."""
import sys
import time

import torch

import peftlab
from peftlab.bench.speed import build_model, time_steps
from peftlab.train.loss import SupervisedLoss


def run(variant: str, model, batch):
    peftlab.adapt(model, "lora", r=16, alpha=32.0, dropout=0.0)
    loss_fn = SupervisedLoss(model, compile_body=variant == "body")
    if variant == "layers":
        for layer in loss_fn.body.layers:
            layer.compile()

    def step():
        total, count = loss_fn(batch)
        (total / count).backward()

    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    seconds, peak = time_steps(step, params, 3, 10)
    print(f"{variant}: {8 * 1024 / seconds:.0f} tok/s, peak {peak:.2f} GiB, wall {time.perf_counter() - start:.0f}s",
          flush=True)
    if variant == "eager" and "--profile" in sys.argv:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    peftlab.delete(model, "default")
    for layer in getattr(loss_fn.body, "layers", []):
        layer._compiled_call_impl = None
    torch._dynamo.reset()


model, config = build_model("llama-3.2-1b", False, torch.device("cuda"))
ids = torch.randint(0, config.vocab_size, (8, 1024), device="cuda")
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
for variant in sys.argv[1].split(","):
    run(variant, model, batch)
