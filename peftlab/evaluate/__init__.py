"""Evaluation in LLM-Adapters' protocol: batched generation, answer extraction, accuracy, result files.

    from peftlab.evaluate import evaluate, summary_table
    results = {path.stem: evaluate(model, tokenizer, path, output_dir="eval/") for path in test_files}
    print(summary_table(results))

tasks.py holds the scoring rules (and how they differ from LLM-Adapters': only AQuA's choice letters,
with ``aqua-reference`` keeping the original rule), generation.py the batched decoding, runner.py
the loop, the records and the files.
"""

from __future__ import annotations

from .generation import generate
from .runner import EvalResult, evaluate, load_records, score, summary_table
from .tasks import (
    ALIASES,
    TASK_NAMES,
    Task,
    TaskError,
    extract_answer_word,
    extract_choice_letter,
    extract_number,
    get_task,
    numbers_match,
    task_from_path,
)

__all__ = [
    "ALIASES", "TASK_NAMES", "EvalResult", "Task", "TaskError", "evaluate", "extract_answer_word",
    "extract_choice_letter", "extract_number", "generate", "get_task", "load_records", "numbers_match", "score",
    "summary_table", "task_from_path",
]
