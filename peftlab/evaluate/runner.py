"""Evaluate a model on a test set: prompts from records, batched generation, scoring, result files.

    result = evaluate(model, tokenizer, "data/math/heldout_gsm8k.json", output_dir="eval/")
    print(summary_table({"heldout_gsm8k": result}))

Records are LLM-Adapters' (``instruction``, ``input``, ``output``, ``answer``) or any format
peftlab.train.templates reads, as long as each has an ``answer``: the label scored against. Labels
are checked against the task before anything is generated, so a file evaluated as the wrong task
fails at once instead of after an hour of decoding.

With ``output_dir``: ``predictions-<name>.jsonl`` (one line per record: index, output, prediction,
label, correct) and ``summary.json`` (one entry per evaluated set, merged with the entries already
there so that several runs build one table). Both are written to a temporary file and renamed, so a
crash never leaves half a file. ``name`` defaults to the file's stem when records come from a path
(heldout_gsm8k and full gsm8k stay apart) and to the task's name otherwise.

Only ``model.generate`` is used, so the same call evaluates a model with adapters attached or merged.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.files import write_atomically, write_json
from peftlab.train.data import read_records
from peftlab.train.templates import DataError, Example, to_example

from .generation import generate
from .tasks import Task, get_task, task_from_path

SUMMARY_FILE = "summary.json"
_FILE_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class EvalResult:
    task: str
    accuracy: float  # percent
    correct: int
    total: int
    predictions: list[dict[str, Any]] = field(repr=False)  # {index, output, prediction, label, correct}

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def evaluate(
    model,
    tokenizer,
    records: Sequence[dict] | str | os.PathLike,
    task: str | Task | None = None,
    *,
    template: str = "alpaca",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    limit: int | None = None,
    progress: bool = True,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> EvalResult:
    """Generate a response for each record, score it by ``task``'s rule and return the accuracy.

    ``records``: a list of records or a JSON / JSONL file (then ``task`` may be left out and is told
    from the file name). ``max_new_tokens`` defaults to the task family's (math 256, commonsense 32);
    ``limit`` keeps the first records only.
    """
    source = Path(records) if isinstance(records, (str, os.PathLike)) else None
    records = load_records(source) if source is not None else list(records)
    task = get_task(task) if task is not None else _task_of(source)
    name = name or (source.stem if source is not None else task.name)
    if not _FILE_SAFE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be usable in a file name (letters, digits, . _ -)")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        records = records[:limit]
    examples = _examples(records, task, template, tokenizer)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    outputs = generate(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size,
                       max_new_tokens=max_new_tokens, num_beams=num_beams, progress=progress)
    result = score(task, examples, outputs)
    if output_dir is not None:
        settings = {"family": task.family, "template": template, "max_new_tokens": max_new_tokens,
                    "num_beams": num_beams}
        write_results(Path(output_dir), name, result, settings)
    return result


def _task_of(source: Path | None) -> Task:
    if source is None:
        raise ValueError("pass the task: it can only be told from a file name when records come from a file")
    return task_from_path(source)


def _examples(records: Sequence[dict], task: Task, template: str, tokenizer) -> list[Example]:
    if not records:
        raise DataError("there are no records to evaluate")
    examples = [to_example(record, index, template, tokenizer) for index, record in enumerate(records)]
    for example in examples:
        if example.answer is None:
            raise DataError(f"record {example.index} has no 'answer': evaluation needs the label to score against")
        problem = task.label_problem(example.answer)
        if problem:
            raise DataError(f"record {example.index}: label {example.answer!r} {problem}, so it can never be "
                            f"scored correct as {task.name}; is this the right task for the file?")
    return examples


def score(task: Task, examples: Sequence[Example], outputs: Sequence[str]) -> EvalResult:
    """Extract each output's answer with ``task``'s rule and compare it with the example's label."""
    predictions = []
    for example, output in zip(examples, outputs, strict=True):
        prediction = task.extract(output)
        predictions.append({"index": example.index, "output": output, "prediction": prediction,
                            "label": example.answer, "correct": task.is_correct(prediction, example.answer)})
    correct = sum(p["correct"] for p in predictions)
    total = len(predictions)
    return EvalResult(task.name, 100.0 * correct / total if total else 0.0, correct, total, predictions)


# --------------------------------------------------------------------------------------------------
# Files


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON list file or a JSONL file (one object a line); every record needs an 'answer'."""
    records = read_records(path)
    for index, record in enumerate(records):
        if record.get("answer") is None:
            raise DataError(f"{path}: record {index} has no 'answer'; evaluation needs the label to score against")
    return records


def write_results(output_dir: Path, name: str, result: EvalResult, settings: dict[str, Any]) -> None:
    """predictions-<name>.jsonl, then <name>'s entry in summary.json (merged with what is there)."""
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
    write_atomically(output_dir / f"predictions-{name}.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    summary = _read_summary(output_dir / SUMMARY_FILE)
    summary[name] = {**result.summary(), **settings}
    write_json(output_dir / SUMMARY_FILE, summary)


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict):
        # Raising would throw away this run's result too; the unreadable entries are lost either way.
        warnings.warn(f"{path} is not a JSON object; starting it afresh", stacklevel=3)
        return {}
    return summary


def summary_table(results: dict[str, EvalResult]) -> str:
    """A markdown table: set, n, correct, accuracy %, and an average row.

    The average accuracy is the unweighted mean over sets, as in LLM-Adapters' tables; n and correct
    in that row are totals.
    """
    rows = ["| set | n | correct | accuracy % |", "|---|---:|---:|---:|"]
    for set_name, result in results.items():
        rows.append(f"| {set_name} | {result.total} | {result.correct} | {result.accuracy:.1f} |")
    if results:
        mean = sum(r.accuracy for r in results.values()) / len(results)
        total = sum(r.total for r in results.values())
        correct = sum(r.correct for r in results.values())
        rows.append(f"| average | {total} | {correct} | {mean:.1f} |")
    return "\n".join(rows)
