"""ATen operations and host reads that each method's training hooks dispatch in one step, on CPU.

    python benchmarks/hook_ops.py --methods triadaptlora,kasa,sorsa

A 16-layer tiny Llama (hidden 256) gets the method with its default options. One training step's hooks are
counted as the trainer runs them, at step 5 of 100, after a first round at step 4 (so host-side caches are
warm): ``on_step``, the regularisation term forward and backward, and ``before_optimizer_step`` after one
forward and backward. Each non-view operation is about one kernel launch on a GPU; a host read
(``_local_scalar_dense``) also makes the host wait for the GPU to drain. Counts that grow with the layers
cost the most on deep models (``peftlab.core.stacked`` keeps them flat).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.bench.speed import OPTIONS
from peftlab.core import api
from peftlab.core.method import TrainingStep


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        elif not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count(method: str, layers: int) -> dict[str, tuple[int, int]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128)
    model = LlamaForCausalLM(config).requires_grad_(False)
    ids = torch.randint(0, 128, (2, 16))
    options = peftlab.method_class(method)(**OPTIONS.get(method, {}))
    calibration = {"calibration": [{"input_ids": ids}]} if getattr(options, "needs_calibration", False) else {}
    peftlab.adapt(model, options, **calibration).train()
    api.on_step(model, TrainingStep(4, 100, 1e-4, 1e-4))
    step = TrainingStep(5, 100, 1e-4, 1e-4)
    counts = {}
    with OpCounter() as counter:
        api.on_step(model, step)
    counts["on_step"] = (counter.ops, counter.host_reads)
    with OpCounter() as counter:
        if (penalty := api.regularization(model)) is not None:
            penalty.backward()
    counts["regularization"] = (counter.ops, counter.host_reads)
    model(input_ids=ids, labels=ids).loss.backward()
    with OpCounter() as counter:
        api.before_optimizer_step(model, step)
    counts["before_optimizer_step"] = (counter.ops, counter.host_reads)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="triadaptlora,kasa,sorsa")
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    for method in args.methods.split(","):
        cells = ", ".join(f"{hook} {ops} ops / {reads} host reads" for hook, (ops, reads) in
                          count(method, args.layers).items())
        print(f"{method}: {cells}", flush=True)


if __name__ == "__main__":
    main()
