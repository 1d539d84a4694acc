"""Data-parallel training: two gloo ranks under torchrun train exactly what one process trains, with the
frozen base whole on every rank or sharded across them (FSDP2).

The test launches this module under ``python -m torch.distributed.run`` (``_worker`` below is what each
rank runs) and compares its outputs with a single-process run of the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.train import checkpoint
from peftlab.train.loop import TrainArgs, Trainer, train

from .conftest import char_tokenizer, tiny_llama
from .test_train import write_data

REPO = Path(__file__).resolve().parents[1]
# No dropout: its masks come from each rank's own random stream, so only dropout-free runs can match
# one process number for number. 40 training records = 20 micro-batches an epoch, so 8 steps of 4 cross
# an epoch boundary; the validation set (4 micro-batches) is split across ranks too.
SETTINGS = dict(model="tiny", method="lora", method_options={"r": 4, "dropout": 0.0}, max_steps=8, batch_size=8,
                micro_batch_size=2, lr=1e-2, warmup_steps=1, cutoff_len=48, template="plain", log_every=1,
                save_every=2, val_size=8, eval_every=4)
INTERRUPT_AT = 5  # after the step-4 checkpoint
# Sharded runs (FSDP2 over the frozen blocks) against one process: LoRA, and DoRA, whose forward reads W.
DORA = dict(method="dora", method_options={"r": 4, "dropout": 0.0})
SHARDED = {"sharded": ("single", {}), "sharded-dora": ("single-dora", DORA)}


def _args(root: Path, run: str, **overrides) -> TrainArgs:
    return TrainArgs(data=str(root / "data.json"), output=str(root / run), **{**SETTINGS, **overrides})


def _train(args: TrainArgs) -> torch.nn.Module:
    model = tiny_llama()
    train(args, model=model, tokenizer=char_tokenizer(), progress=False)
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- worker


def _forbid_writes(rank: int) -> None:
    """Make every file the trainer writes an error on this rank: only rank 0 may write."""
    import peftlab.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {rank} wrote training output")

    loop.write_json = checkpoint.write = peftlab.save = loop._Metrics = refuse


def _worker(root: Path) -> None:
    rank = int(os.environ["RANK"])
    if rank:
        _forbid_writes(rank)
    torch.save(_trainable(_train(_args(root, "full"))), root / f"full-rank{rank}.pt")

    original = Trainer._step

    def killed(self, batches, loss_fn, step):
        if step == INTERRUPT_AT:
            raise KeyboardInterrupt  # a hard kill on every rank: nothing saved at this step
        return original(self, batches, loss_fn, step)

    Trainer._step = killed
    try:
        _train(_args(root, "resumed"))
    except KeyboardInterrupt:
        pass
    Trainer._step = original
    torch.save(_trainable(_train(_args(root, "resumed", resume=True))), root / f"resumed-rank{rank}.pt")
    for run, (_, overrides) in SHARDED.items():
        model = _train(_args(root, run, shard=True, **overrides))
        torch.save({**_trainable(model), "held": _shard_fraction(model)}, root / f"{run}-rank{rank}.pt")


def _shard_fraction(model: torch.nn.Module) -> torch.Tensor:
    """(elements of the frozen block weights this rank holds, elements of them in the model)."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in model.model.layers.parameters() if isinstance(p, DTensor)]
    assert sharded and not any(p.requires_grad for p in sharded), "adapters must stay whole"
    return torch.tensor([sum(p.to_local().numel() for p in sharded), sum(p.numel() for p in sharded)])


# -------------------------------------------------------------------------------------------- tests


def test_two_ranks_match_one_process_and_resume(tmp_path):
    write_data(tmp_path / "data.json")
    trained = {"single": _trainable(_train(_args(tmp_path, "single"))),
               "single-dora": _trainable(_train(_args(tmp_path, "single-dora", **DORA)))}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "tests.test_distributed", str(tmp_path)]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    references = {"full": "single", "resumed": "single", **{run: ref for run, (ref, _) in SHARDED.items()}}
    for run, reference in references.items():
        single = trained[reference]
        reference_rows = _metrics(tmp_path / reference)
        reference_adapter = load_file(tmp_path / reference / "adapter_model.safetensors")
        output = tmp_path / run
        rank0, rank1 = torch.load(tmp_path / f"{run}-rank0.pt"), torch.load(tmp_path / f"{run}-rank1.pt")
        if run in SHARDED:  # each rank held half of the frozen block weights
            held0, held1 = rank0.pop("held"), rank1.pop("held")
            assert held0[0] + held1[0] == held0[1] == held1[1] and held0[0] == held0[1] // 2
        assert rank0.keys() == rank1.keys() == single.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas drifted apart"
        weight_gap = max((rank0[k] - single[k]).abs().max().item() for k in single)
        adapter = load_file(output / "adapter_model.safetensors")
        file_gap = max((adapter[k] - reference_adapter[k]).abs().max().item() for k in reference_adapter)

        rows = _metrics(output)
        assert [r.get("step") for r in rows] == [r.get("step") for r in reference_rows]  # one writer, no repeats
        gaps = {key: max(abs(r[key] - s[key]) for r, s in zip(rows, reference_rows) if key in s)
                for key in ("loss", "grad_norm", "val_loss", "tokens")}
        print(f"\n{run}: max |adapter weight diff| {weight_gap:.2e} (saved file {file_gap:.2e}), "
              + ", ".join(f"max |{k} diff| {v:.2e}" for k, v in gaps.items()))
        assert weight_gap < 1e-5 and file_gap < 1e-5
        assert gaps["loss"] < 1e-5 and gaps["grad_norm"] < 1e-5 and gaps["val_loss"] < 1e-5 and gaps["tokens"] == 0
        assert {p.name for p in output.iterdir()} == {p.name for p in (tmp_path / reference).iterdir()}
        bases = [json.loads((run_dir / "adapter_config.json").read_text())["base"]
                 for run_dir in (output, tmp_path / reference)]
        assert bases[0] == bases[1]  # same fingerprint of the base, though no rank held it whole
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step-00000006", "step-00000008"]
    state = checkpoint.read_state(tmp_path / "resumed" / "checkpoints" / "step-00000008")
    assert len(state["rank_rng"]) == 2  # each rank's own random streams, restored on resume


def test_batch_that_does_not_split_evenly_across_ranks_is_refused(tmp_path, monkeypatch):
    write_data(tmp_path / "data.json")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(peftlab.PeftlabError, match="batch_size 8 must be a multiple of world_size x "
                                                    "micro_batch_size = 3 x 2"):
        Trainer(_args(tmp_path, "run"), model=tiny_llama(), tokenizer=char_tokenizer(), progress=False)


def test_shard_refuses_compile_and_models_without_blocks(tmp_path):
    from peftlab.train.distributed import Distributed, shard_frozen_base

    with pytest.raises(peftlab.PeftlabError, match="shard and compile together"):
        _args(tmp_path, "run", shard=True, compile=True).validate()
    model = peftlab.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora", r=2)
    with pytest.raises(peftlab.PeftlabError, match="Sequential has no list of repeated transformer blocks"):
        shard_frozen_base(model, Distributed(world_size=2))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
