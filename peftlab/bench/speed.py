"""Training speed and memory, peftlab beside HF PEFT, in one process on one GPU.

    python -m peftlab.bench.speed --shapes llama-3.2-1b --methods lora,dora --batch 8 --seq 1024

For every model shape (random weights: they do not change speed; bf16, SDPA attention) and method,
time optimizer steps of peftlab (its own training path: adapters computing in bf16 on fp32 master
weights, the fused head + cross-entropy; compiled and checkpointed, blocks recompute only what backward
reads: peftlab.train.loss.compile_blocks) and of HF PEFT where PEFT has the method (the standard
recipe: ``model(**batch, labels=...).loss`` under bf16 autocast, as HF Trainer runs it). Both see the
same batch, loss on every token, AdamW on the adapter parameters. peftlab's step includes the methods'
training hooks as its trainer runs them (``on_step``, the regularisation term, ``before_optimizer_step``),
as steps from the middle of a ``NOMINAL_TOTAL_STEPS`` run: regularisers and per-step updates cost launches
and host reads too.

Reported per row: tokens/s, peak GiB (torch.cuda.max_memory_allocated), the ratio to PEFT and MFU.
Model FLOPs per token follow the usual convention for a frozen base: 4·N for the N weights in
linear layers (forward and input gradient; the head included) plus 12·layers·seq·d_attention for
attention (forward 4·seq·d, backward twice that), over the chip's bf16 rate measured at start (an
8192³ matmul).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import peftlab
from peftlab.budget import architecture_config
from peftlab.core import api
from peftlab.core.method import TrainingStep

# Options for a like-for-like comparison; PEFT's equivalent config builder, when PEFT has the method.
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
PEFT_METHODS = {
    "lora": lambda peft, t: peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=t),
    "dora": lambda peft, t: peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=t, use_dora=True),
    "ia3": lambda peft, t: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"]),
    "randlora": lambda peft, t: peft.RandLoraConfig(r=32, target_modules=t),
    "prompt": lambda peft, t: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    "prefix": lambda peft, t: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30),
}
# bitfit: Llama has no biases, so it gets zero-initialised ones; qwha: no quantized base to fit here;
# multi-task methods: every example of task 0, so the task-specific parts run as in training.
OPTIONS = {"lora": LORA, "dora": LORA, "randlora": {"r": 32}, "prompt": {"num_virtual_tokens": 20},
           "prefix": {"num_virtual_tokens": 30}, "bitfit": {"add_bias": True}, "qwha": {"init": "random"},
           **{name: {"default_task": 0} for name in ("mtlora", "omnilora", "polyhistor", "divcontrol")}}
LEARNING_RATE = 1e-5
# Methods with schedules see warm-up and timed steps as steps from the middle of a run this long: phases that
# end early (rank growth, DiffoRA's search, LoCA's location learning) have ended, as for most of a run.
NOMINAL_TOTAL_STEPS = 1000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Row:
    shape: str
    method: str
    batch: int
    seq: int
    tok_s: float | None
    peft_tok_s: float | None
    ratio_vs_peft: float | None
    peak_gib: float | None
    peft_peak_gib: float | None
    mfu: float | None
    step_ratio_vs_lora: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_peak_tflops(device: torch.device, size: int = 8192) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 10 * 2 * size**3 / (time.perf_counter() - start) / 1e12


def flops_per_token(model, config, seq: int) -> float:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # head included
    heads = config.num_attention_heads
    d_attn = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 4 * linear + 12 * config.num_hidden_layers * seq * d_attn


def build_model(shape: str, checkpointing: bool, device: torch.device):
    from transformers import AutoModelForCausalLM

    config = architecture_config(shape)
    config._attn_implementation = "sdpa"
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, config


def time_steps(step, params, warmup: int, steps: int) -> tuple[float, float | None]:
    """(seconds per step, peak GiB on CUDA) of ``step()`` followed by AdamW on ``params``."""
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=device.type == "cuda")
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


@dataclass
class Settings:
    """How peftlab runs its steps (SupervisedLoss's options of the same names)."""

    compiled: bool = False
    activation_budget: float | None = None
    offload: bool = False
    cuda_graphs: bool = False


def peftlab_run(model, method: str, batch: dict, warmup: int, steps: int, settings: Settings):
    from peftlab.train.loss import SupervisedLoss

    config = peftlab.method_class(method)(**OPTIONS.get(method, {}))
    # Data-dependent initialisers see two sequences of the timed batch: their cost is not timed.
    extra = {}
    if getattr(config, "needs_calibration", False):
        extra["calibration"] = [{k: v[:2] for k, v in batch.items() if k != "labels"}]
    peftlab.adapt(model, config, **extra)
    loss_fn = SupervisedLoss(model, compile_body=settings.compiled, activation_budget=settings.activation_budget,
                             offload_activations=settings.offload, cuda_graphs=settings.cuda_graphs)

    steps_done = itertools.count(NOMINAL_TOTAL_STEPS // 2)

    def step():
        info = TrainingStep(next(steps_done), NOMINAL_TOTAL_STEPS, LEARNING_RATE, LEARNING_RATE)
        api.on_step(model, info)
        total, count = loss_fn(batch)
        loss = total / count
        if (penalty := api.regularization(model)) is not None:
            loss = loss + penalty
        loss.backward()
        api.before_optimizer_step(model, info)

    try:
        return time_steps(step, [p for p in model.parameters() if p.requires_grad], warmup, steps)
    finally:
        loss_fn.release()  # PEFT's run on this model must not inherit compiled blocks
        peftlab.delete(model, "default")
        if settings.compiled:  # every method recompiles the blocks: keep dynamo's per-code cache limit out of the way
            torch._dynamo.reset()


def peft_run(model, method: str, batch: dict, warmup: int, steps: int):
    import peft

    config = PEFT_METHODS[method](peft, TARGETS)
    wrapped = peft.get_peft_model(model, config)

    def step():
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
            loss = wrapped(**batch).loss
        loss.backward()

    try:
        return time_steps(step, [p for p in wrapped.parameters() if p.requires_grad], warmup, steps)
    finally:
        if hasattr(wrapped.base_model, "unload"):
            wrapped.base_model.unload()
        model.requires_grad_(False)


def bench_shape(shape: str, methods: list[str], impls: list[str], batch_size: int, seq: int, warmup: int,
                steps: int, checkpointing: bool, settings: Settings, peak: float,
                device: torch.device) -> Iterator[Row]:
    """One row per method, yielded as soon as it is measured."""
    model, config = build_model(shape, checkpointing, device)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    per_token = flops_per_token(model, config, seq)
    lora_step = None
    for method in methods:
        tok_s = peak_gib = peft_tok_s = peft_peak = None
        note = []
        if "peftlab" in impls:
            try:
                seconds, peak_gib = peftlab_run(model, method, batch, warmup, steps, settings)
                tok_s = batch_size * seq / seconds
                lora_step = seconds if method == "lora" else lora_step
            except torch.OutOfMemoryError:
                note.append("peftlab: out of memory")
            except Exception as exc:  # noqa: BLE001 - one failing method must not end the sweep
                note.append(f"peftlab: {type(exc).__name__}: {exc}"[:200])
            _free()
        if "peft" in impls and method in PEFT_METHODS:
            try:
                seconds, peft_peak = peft_run(model, method, batch, warmup, steps)
                peft_tok_s = batch_size * seq / seconds
            except torch.OutOfMemoryError:
                note.append("peft: out of memory")
            except Exception as exc:  # noqa: BLE001
                note.append(f"peft: {type(exc).__name__}: {exc}"[:200])
            _free()
        row = Row(shape, method, batch_size, seq, _round(tok_s), _round(peft_tok_s),
                  _round(tok_s / peft_tok_s, 3) if tok_s and peft_tok_s else None, _round(peak_gib, 2),
                  _round(peft_peak, 2), _round(tok_s * per_token / (peak * 1e12), 3) if tok_s else None,
                  _round(batch_size * seq / tok_s / lora_step, 3) if tok_s and lora_step else None, "; ".join(note))
        print(json.dumps(asdict(row)), flush=True)
        yield row
    del model
    _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)


def markdown(rows: list[Row]) -> str:
    lines = ["| shape | method | batch x seq | peftlab tok/s | PEFT tok/s | ratio | peak GiB | PEFT peak GiB "
             "| MFU | step vs LoRA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.shape, r.method, f"{r.batch}x{r.seq}", r.tok_s, r.peft_tok_s, r.ratio_vs_peft, r.peak_gib,
                 r.peft_peak_gib, r.mfu, r.step_ratio_vs_lora]
        lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab bench speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama-3.2-1b")
    parser.add_argument("--methods", default="lora,dora")
    parser.add_argument("--impl", default="peftlab,peft")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (both libraries)")
    parser.add_argument("--compile", action="store_true", help="torch.compile peftlab's transformer body")
    parser.add_argument("--activation-budget", type=float, default=None,
                        help="compiled blocks keep this share of their activations for backward (with "
                             "--checkpointing: 0, keeping only block inputs as checkpointing does)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="peftlab keeps what backward reads in host memory (peftlab.train.offload)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="peftlab's compiled blocks replay as CUDA graphs (needs --compile)")
    parser.add_argument("--output", default=f"benchmarks/results/speed-{datetime.date.today()}")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the harness itself")
    args = parser.parse_args(argv)
    if args.cuda_graphs and not args.compile:
        parser.error("--cuda-graphs replays compiled blocks: add --compile")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("peftlab bench speed needs a CUDA GPU")
    peak = bf16_peak_tflops(device, 8192 if device.type == "cuda" else 256)
    methods = peftlab.methods() if args.methods == "all" else args.methods.split(",")
    settings = Settings(args.compile, args.activation_budget, args.offload_activations, args.cuda_graphs)
    command = "python -m peftlab.bench.speed " + " ".join(argv or sys.argv[1:])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for shape in args.shapes.split(","):
        for row in bench_shape(shape, methods, args.impl.split(","), args.batch, args.seq, args.warmup, args.steps,
                               args.checkpointing, settings, peak, device):
            rows.append(row)
            write_results(Path(args.output), command, name, peak, rows)  # each row: a time limit loses none
    print(markdown(rows))
    return 0


def write_results(output: Path, command: str, device: str, peak: float, rows: list[Row]) -> None:
    result = {"command": command, "device": device, "bf16_peak_tflops": round(peak, 1),
              "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    output.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: a stem like speed-budget-0.15 has a dot of its own.
    output.with_name(output.name + ".json").write_text(json.dumps(result, indent=1))
    header = f"`{command}` on {device} (bf16 peak {peak:.0f} TFLOP/s)\n\n"
    output.with_name(output.name + ".md").write_text(header + markdown(rows))


if __name__ == "__main__":
    raise SystemExit(main())
