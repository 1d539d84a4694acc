"""Turning records into (prompt, response) pairs.

Record formats, recognised by their keys:

* LLM-Adapters / Alpaca: ``instruction``, optional ``input``, ``output`` (and LLM-Adapters'
  ``answer``, the label that evaluation scores against);
* completion: ``prompt`` and ``completion``;
* chat: ``messages`` (role/content dicts); the last assistant message is the response, everything
  before it is rendered with the tokenizer's chat template.

Templates for instruction records: ``alpaca`` (LLM-Adapters' prompt, without the accidental
16-space indentation of its source; see shared/methods/llm_adapters.md) and ``plain`` (instruction
and input only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.core.errors import PeftlabError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "plain")


class DataError(PeftlabError, ValueError):
    """A data file or record is unusable; the message names the record."""


@dataclass
class Example:
    prompt: str
    response: str
    answer: str | None  # the gold label for evaluation, when the record has one
    index: int  # position in the source file, for messages
    task: str | None = None  # for multi-task adapters: the record's "task" field


def to_example(record: Any, index: int, template: str = "alpaca", tokenizer=None) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"record {index} is a {type(record).__name__}, expected an object")
    example = _example(record, index, template, tokenizer)
    if record.get("task") is not None:
        example.task = str(record["task"])
    return example


def _example(record: dict, index: int, template: str, tokenizer) -> Example:
    if "messages" in record:
        return _chat_example(record, index, tokenizer)
    if "prompt" in record and "completion" in record:
        return Example(str(record["prompt"]), str(record["completion"]), _answer(record), index)
    if "instruction" not in record:
        raise DataError(f"record {index} has none of instruction / prompt+completion / messages "
                        f"(keys: {', '.join(sorted(record)) or 'none'})")
    return Example(render_prompt(record, template, index), str(record.get("output", "")), _answer(record), index)


def render_prompt(record: dict, template: str = "alpaca", index: int = 0) -> str:
    instruction = str(record["instruction"]).strip()
    if not instruction:
        raise DataError(f"record {index} has an empty instruction")
    extra = str(record.get("input") or "").strip()
    if template == "alpaca":
        if extra:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
        return ALPACA.format(instruction=instruction)
    if template == "plain":
        return f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
    raise DataError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}")


def _answer(record: dict) -> str | None:
    answer = record.get("answer")
    return None if answer is None else str(answer).strip()


def _chat_example(record: dict, index: int, tokenizer) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"record {index}: messages must be a non-empty list of role/content objects")
    if messages[-1].get("role") != "assistant":
        raise DataError(f"record {index}: the last message must be the assistant's response")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"record {index} is a chat record but the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return Example(prompt, str(messages[-1].get("content", "")), _answer(record), index)
