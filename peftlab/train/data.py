"""Training data: reading files, tokenising (prompt, response) pairs, batching.

Loss is on response tokens only by default (``train_on_inputs=True`` scores the prompt too, as
LLM-Adapters does). Each sequence is ``prompt + response + EOS`` cut at ``cutoff_len``; EOS survives
only when the sequence fits, as in LLM-Adapters. Batches are right-padded; with length grouping,
micro-batches are cut from length-sorted mega-batches of a seeded shuffle, so padding stays small
and every epoch's order is reproducible from (seed, epoch) alone, which is what resuming needs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .templates import DataError, Example, to_example

IGNORE = -100
OVERLONG = ("truncate", "drop", "error")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON array file or a JSON-lines file; errors say where the file is broken."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path} is empty")
    records = _parse_json_list(path, text) if text.lstrip().startswith("[") else _parse_jsonl(path, text)
    if not records:
        raise DataError(f"{path} holds no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
    return records


def _parse_json_list(path: Path, text: str) -> list:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records")
    return records


def _parse_jsonl(path: Path, text: str) -> list:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {line_number}, column {exc.colno}: {exc.msg} "
                            f"(JSONL: one record a line)") from None
    return records


def load_examples(path: str | Path, template: str = "alpaca", tokenizer=None) -> list[Example]:
    return [to_example(r, i, template, tokenizer) for i, r in enumerate(read_records(path))]


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    index: int  # the record it came from
    task: str | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(examples: list[Example], tokenizer, *, cutoff_len: int, train_on_inputs: bool = False,
             overlong: str = "truncate") -> list[Sequence]:
    """Token ids and labels; ``overlong`` says what to do with sequences longer than the cutoff."""
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    sequences = []
    for example, prompt, response in zip(examples, prompts, responses):
        ids = prompt + response + [tokenizer.eos_token_id]
        labels = ids[:] if train_on_inputs else [IGNORE] * len(prompt) + response + [tokenizer.eos_token_id]
        if len(ids) > cutoff_len:
            if overlong == "error" or (len(prompt) >= cutoff_len and overlong == "truncate"):
                raise DataError(f"record {example.index} is {len(ids)} tokens (prompt {len(prompt)}), longer than "
                                f"cutoff_len={cutoff_len}; raise cutoff_len or set overlong=drop")
            if overlong == "drop":
                continue
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == IGNORE for label in labels):
            raise DataError(f"record {example.index} has an empty response: nothing to learn from")
        sequences.append(Sequence(ids, labels, example.index, example.task))
    if not sequences:
        raise DataError(f"no record fits cutoff_len={cutoff_len}")
    return sequences


def split_validation(sequences: list[Sequence], size: int, seed: int) -> tuple[list[Sequence], list[Sequence]]:
    if size <= 0:
        return sequences, []
    if size >= len(sequences):
        raise DataError(f"validation size {size} leaves no training data ({len(sequences)} records)")
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [s for i, s in enumerate(sequences) if i not in held], [sequences[i] for i in sorted(held)]


def epoch_batches(lengths: list[int], micro_batch_size: int, *, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The micro-batches (lists of sequence indices) of one epoch, a pure function of its arguments."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = 64 * micro_batch_size
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(sequences: list[Sequence], pad_id: int, tasks: list[str] | None = None,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (and task_ids when ``tasks`` names them), as wide
    as the longest sequence or ``width`` if that is wider."""
    width = max(width or 0, *(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s.input_ids)
        labels[row, :len(s)] = torch.tensor(s.labels)
        mask[row, :len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if tasks:
        batch["task_ids"] = torch.tensor([tasks.index(s.task) for s in sequences])
    return batch


def pack(sequences: list[Sequence], cutoff_len: int) -> list[list[Sequence]]:
    """Greedy first-fit packing of sequences into rows of at most ``cutoff_len`` tokens."""
    rows: list[list[Sequence]] = []
    room: list[int] = []
    for s in sorted(sequences, key=len, reverse=True):
        for r, free in enumerate(room):
            if len(s) <= free:
                rows[r].append(s)
                room[r] -= len(s)
                break
        else:
            rows.append([s])
            room.append(cutoff_len - len(s))
    return rows


def collate_packed(rows: list[list[Sequence]], pad_id: int, dtype: torch.dtype,
                   width: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows with per-sequence positions and a block-diagonal causal 4-D mask, so packed
    sequences never attend to each other whatever the attention implementation; as wide as the longest
    row or ``width`` if that is wider."""
    width = max(width or 0, *(sum(len(s) for s in row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            end = start + len(s)
            ids[r, start:end] = torch.tensor(s.input_ids)
            labels[r, start:end] = torch.tensor(s.labels)
            labels[r, start] = IGNORE  # never predict a sequence's first token from the previous one
            positions[r, start:end] = torch.arange(len(s))
            segment[r, start:end] = k
            start = end
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = same & causal
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no NaN softmax
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": positions, "labels": labels}
