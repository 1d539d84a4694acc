"""GPU memory of LoRA training on a bf16 base vs an NF4 (QLoRA) base, Llama-3.2-1B shape, random weights.

    python benchmarks/gpu/qlora_memory.py --out $OUT/qlora.json

For each base (bf16; NF4 through bitsandbytes' kernels; NF4 through peftlab's PyTorch quantizer), with
and without gradient checkpointing: a fresh model, LoRA r=16 on all seven projections, AdamW, a few
optimizer steps on one batch. Reported per row: the base's resident memory before training
(torch.cuda.memory_allocated), the peak during the steps (max_memory_allocated), tokens/s and the
first step's loss (NF4 and bf16 losses should be close: the same random weights, 4-bit rounded).
Without bitsandbytes the NF4 rows use peftlab's quantizer only and say so. Takes about a minute on
an H100. ``--device cpu --shape tiny-llama`` only checks the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import peftlab  # noqa: E402
from peftlab import quant  # noqa: E402
from peftlab.bench.speed import build_model  # noqa: E402
from peftlab.train.loss import SupervisedLoss  # noqa: E402

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
GIB = 2**30


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None


def train_steps(model, batch, warmup: int, steps: int, device: torch.device) -> dict:
    """LoRA on the model, AdamW; (first loss, seconds per step, peak GiB)."""
    peftlab.adapt(model, "lora", **LORA)
    loss_fn = SupervisedLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    losses = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        total, count = loss_fn(batch)
        loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return {"first_loss": losses[0], "last_loss": losses[-1], "seconds_per_step": seconds, "peak_gib": peak,
            "trainable": sum(p.numel() for p in params)}


def run(base: str, checkpointing: bool, args, device: torch.device) -> dict:
    free()
    torch.manual_seed(0)  # the same random weights for every base
    model, config = build_model(args.shape, checkpointing, device)
    before = allocated(device)
    row: dict = {"base": base, "checkpointing": checkpointing}
    if base != "bf16":
        started = time.perf_counter()
        quant.quantize(model, backend="bitsandbytes" if base == "nf4-bitsandbytes" else "simulated")
        row["quantize_seconds"] = round(time.perf_counter() - started, 2)
        row["nf4"] = quant.footprint(model)
    free()
    row["model_gib"] = allocated(device)
    row["model_gib_before_quantization"] = before
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    try:
        row.update(train_steps(model, batch, args.warmup, args.steps, device))
        row["tok_s"] = args.batch * args.seq / row["seconds_per_step"]
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    del model, batch
    free()
    return row


def run_or_note(base: str, checkpointing: bool, args, device: torch.device) -> dict:
    """One failing base (say, a bitsandbytes build without kernels for this GPU) must not end the others."""
    try:
        return run(base, checkpointing, args, device)
    except Exception as exc:  # noqa: BLE001
        free()
        return {"base": base, "checkpointing": checkpointing, "note": f"{type(exc).__name__}: {exc}"[:300]}


def summary(rows: list[dict]) -> dict:
    """GiB saved by each NF4 base against bf16, at rest and at the training peak."""
    saved = {}
    for row in rows:
        if row["base"] == "bf16":
            continue
        ref = next((r for r in rows if r["base"] == "bf16" and r["checkpointing"] == row["checkpointing"]), None)
        if ref is None or row.get("model_gib") is None or row.get("peak_gib") is None or ref.get("peak_gib") is None:
            continue
        key = f"{row['base']}{'+ckpt' if row['checkpointing'] else ''}"
        saved[key] = {"model_gib_saved": ref["model_gib"] - row["model_gib"],
                      "peak_gib_saved": ref["peak_gib"] - row["peak_gib"],
                      "peak_ratio": row["peak_gib"] / ref["peak_gib"]}
    return saved


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else "—".rjust(width)


def table(rows: list[dict]) -> str:
    head = f"{'base':<18} {'ckpt':<5} {'model GiB':>9} {'peak GiB':>9} {'tok/s':>8} {'loss0':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [_cell(r.get("model_gib"), 9, 3), _cell(r.get("peak_gib"), 9, 3), _cell(r.get("tok_s"), 8, 0),
                 _cell(r.get("first_loss"), 7, 3)]
        lines.append(f"{r['base']:<18} {str(r['checkpointing']):<5} {' '.join(cells)} {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="qlora.json", help="JSON file to write")
    parser.add_argument("--shape", default="llama-3.2-1b", help="an architecture of peftlab.budget.ARCHITECTURES")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("qlora_memory.py needs a CUDA GPU (or --device cpu to check the script)")
    bnb_version = None
    if quant.bitsandbytes_available():
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    nf4_bases = ["nf4-simulated"]
    if bnb_version and device.type == "cuda":
        nf4_bases.insert(0, "nf4-bitsandbytes")
    else:
        print("bitsandbytes is not importable here (or no GPU): the NF4 rows use peftlab's PyTorch quantizer "
              "only (base 'nf4-simulated'); pip install 'bitsandbytes>=0.45' for the bitsandbytes kernels.",
              flush=True)
    rows, started = [], time.perf_counter()
    for checkpointing in (False, True):
        for base in ["bf16", *nf4_bases]:
            row = run_or_note(base, checkpointing, args, device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "command": "python benchmarks/gpu/qlora_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "bitsandbytes": bnb_version, "shape": args.shape,
        "batch": args.batch, "seq": args.seq, "lora": LORA, "rows": rows, "saved": summary(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(rows))
    print(json.dumps(result["saved"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
