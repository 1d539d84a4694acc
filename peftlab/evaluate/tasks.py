r"""Evaluation tasks: which answer a generated response gives, and whether it is right.

The reference is LLM-Adapters (AGI-Edgerunners/LLM-Adapters, commit 8166572): ``evaluate.py`` for
the math sets, ``commonsense_evaluate.py`` for the commonsense sets. Families:

* ``math`` (gsm8k, svamp, multiarith, addsub, singleeq, mawps): commas are removed, the LAST number
  matching ``-?\d+\.?\d*`` is the prediction, correct when ``|prediction - label| <= 0.001`` (the
  reference's ``<=``); no number is a miss. As the reference, except that labels may carry thousands
  separators (the reference's ``float(label)`` would crash on them; its data has none).
* ``aqua`` [peftlab differs]: the reference takes the FIRST character of the response in A-E, so
  the capital of any word ("Bob", "Each", "After ...") is read as the answer. peftlab reads choice
  letters as whole tokens: the letter after the last "answer is" ("The answer is (C).",
  "answer is C"; the phrase case-insensitive, the letter a capital), else the last standalone
  ``\b[A-E]\b``. ``aqua-reference`` (or ``extract_choice_letter(text, strict_reference=True)``) keeps
  the reference's rule, for numbers comparable with its published tables.
* commonsense (boolq, piqa, social_i_qa, arc-easy, arc-challenge, openbookqa, hellaswag,
  winogrande): the FIRST occurrence of one of the set's answer words (case-sensitive, anywhere,
  as the reference's ``re.findall(r'true|false', ...)[0]``), compared to the label as a string.

All families score the response only up to a "### Response:" the model starts on its own: the
reference decodes prompt and output together and keeps ``split("### Response:")[1]``, which drops
everything from the second occurrence on. Labels are checked before any generation: a label that
cannot be right under the task's rule (a word on a math set, "answer6" on ARC) means the file and the
task do not match, and is an error rather than a silent zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from peftlab.core.errors import PeftlabError

RESPONSE_MARKER = "### Response:"
TOLERANCE = 0.001  # LLM-Adapters' ``miss``

MATH_SETS = ("gsm8k", "svamp", "multiarith", "addsub", "singleeq", "mawps")
_ANSWERS_1_TO_5 = tuple(f"answer{i}" for i in range(1, 6))
ANSWER_WORDS = {  # commonsense_evaluate.py's extract_answer, set by set, in its regex order
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWERS_1_TO_5,
    "arc-easy": _ANSWERS_1_TO_5,
    "arc-challenge": _ANSWERS_1_TO_5,
    "openbookqa": _ANSWERS_1_TO_5,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}
MAX_NEW_TOKENS = {"math": 256, "aqua": 256, "aqua-reference": 256, "commonsense": 32}  # as LLM-Adapters

_NUMBER = re.compile(r"-?\d+\.?\d*")
_CHOICE_LETTERS = ("A", "B", "C", "D", "E")
_LETTER_AFTER_ANSWER_IS = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([A-E])\b")
_STANDALONE_LETTER = re.compile(r"\b([A-E])\b")
_REFERENCE_LETTER = re.compile(r"A|B|C|D|E")


class TaskError(PeftlabError, ValueError):
    """An unknown task name, or a file name from which no task can be told."""


# --------------------------------------------------------------------------------------------------
# Extraction rules (public: they are the documented scoring)


def extract_number(text: str) -> str | None:
    """The last number in ``text`` once commas are removed (LLM-Adapters' rule); None if there is none."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def numbers_match(prediction: str | None, label: str, tolerance: float = TOLERANCE) -> bool:
    if prediction is None:
        return False
    return abs(float(prediction) - parse_number_label(label)) <= tolerance


def parse_number_label(label: str) -> float:
    value = float(str(label).replace(",", "").strip())  # ValueError names the label
    if not math.isfinite(value):
        raise ValueError(f"label {label!r} is not a finite number")
    return value


def extract_choice_letter(text: str, *, strict_reference: bool = False) -> str | None:
    """The multiple-choice letter A-E a response gives; None if it gives none.

    Default: the letter after the last "answer is", else the last standalone capital A-E.
    ``strict_reference=True``: LLM-Adapters' rule, the first capital A-E anywhere (inside words too).
    """
    if strict_reference:
        found = _REFERENCE_LETTER.search(text)
        return found.group() if found else None
    stated = _LETTER_AFTER_ANSWER_IS.findall(text)
    if stated:
        return stated[-1]
    letters = _STANDALONE_LETTER.findall(text)
    return letters[-1] if letters else None


def extract_answer_word(text: str, words: tuple[str, ...]) -> str | None:
    """The first occurrence of any of ``words`` in ``text`` (commonsense_evaluate.py's rule)."""
    found = re.search("|".join(re.escape(w) for w in words), text)
    return found.group() if found else None


def scored_part(output: str) -> str:
    """The part of a response the reference scores: up to a "### Response:" the model starts itself."""
    return output.split(RESPONSE_MARKER, 1)[0].strip()


# --------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    """A test set's scoring: ``name`` labels results, ``family`` picks the rule."""

    name: str  # canonical set name: "gsm8k", "aqua", "social_i_qa", ...
    family: str  # "math", "aqua", "aqua-reference" or "commonsense"
    max_new_tokens: int
    answer_words: tuple[str, ...] = ()  # commonsense only

    def extract(self, output: str) -> str | None:
        text = scored_part(output)
        if self.family == "math":
            return extract_number(text)
        if self.family in ("aqua", "aqua-reference"):
            return extract_choice_letter(text, strict_reference=self.family == "aqua-reference")
        return extract_answer_word(text, self.answer_words)

    def is_correct(self, prediction: str | None, label: str) -> bool:
        if self.family == "math":
            return numbers_match(prediction, label)
        return prediction is not None and prediction == label  # the reference compares strings

    def label_problem(self, label: str) -> str | None:
        """Why ``label`` can never be scored correct under this task's rule; None if it can."""
        if self.family == "math":
            try:
                parse_number_label(label)
            except ValueError:
                return "is not a number"
            return None
        allowed = self.answer_words if self.family == "commonsense" else _CHOICE_LETTERS
        return None if label in allowed else f"is not one of {'/'.join(allowed)}"


def _registry() -> dict[str, Task]:
    tasks = {name: Task(name, "math", MAX_NEW_TOKENS["math"]) for name in ("math", *MATH_SETS)}
    tasks["aqua"] = Task("aqua", "aqua", MAX_NEW_TOKENS["aqua"])
    tasks["aqua-reference"] = Task("aqua-reference", "aqua-reference", MAX_NEW_TOKENS["aqua-reference"])
    for name, words in ANSWER_WORDS.items():
        tasks[name] = Task(name, "commonsense", MAX_NEW_TOKENS["commonsense"], words)
    return tasks


TASKS = _registry()
TASK_NAMES = tuple(TASKS)
ALIASES = {"siqa": "social_i_qa", "obqa": "openbookqa", "arc-e": "arc-easy", "arc-c": "arc-challenge"}


def _key(name: str) -> str:
    """Spelling-insensitive lookup key: "ARC-Easy", "arc_easy" and "arc-easy" are one set."""
    return re.sub(r"[\s_-]", "", name.lower())


_BY_KEY = {_key(name): name for name in TASK_NAMES} | {_key(a): target for a, target in ALIASES.items()}


def get_task(name: str | Task, *, strict_reference: bool = False) -> Task:
    """The task called ``name`` (any case, ``-``/``_`` alike, aliases such as siqa, obqa).

    ``strict_reference=True`` scores as LLM-Adapters does; only AQuA's rule changes (to aqua-reference).
    """
    if isinstance(name, Task):
        task = name
    else:
        canonical = _BY_KEY.get(_key(str(name)))
        if canonical is None:
            raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)} "
                            f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})")
        task = TASKS[canonical]
    if strict_reference and task.family == "aqua":
        return TASKS["aqua-reference"]
    return task


def extract(task: str | Task, output: str) -> str | None:
    """The answer ``output`` gives under ``task``'s rule (a task name or a Task)."""
    return get_task(task).extract(output)


def is_correct(task: str | Task, prediction: str | None, label: str) -> bool:
    return get_task(task).is_correct(prediction, label)


_FILE_STEM = re.compile(r"^(?:heldout[_-])?(?P<set>.+?)(?:[_-](?:test|train|dev|val|validation))?$", re.IGNORECASE)
_GENERIC_STEMS = {"test", "train", "dev", "val", "validation", "heldout", "data"}


def task_from_path(path) -> Task:
    """The task of a test file: heldout_gsm8k.json, boolq_test.json, arc-easy_test.jsonl, math/full/svamp.json,
    or LLM-Adapters' dataset/<set>/test.json (a generic file name defers to its folder)."""
    path = Path(path)
    stem = _FILE_STEM.match(path.stem).group("set")
    candidate = path.parent.name if stem.lower() in _GENERIC_STEMS else stem
    canonical = _BY_KEY.get(_key(candidate))
    if canonical is None:
        raise TaskError(f"cannot tell the task from the file name {path.name!r}; pass the task explicitly "
                        f"(tasks: {', '.join(TASK_NAMES)})")
    return TASKS[canonical]
