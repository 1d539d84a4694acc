"""Evaluation: LLM-Adapters' answer extraction, task lookup, batched generation, evaluate() and its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.evaluate import (
    EvalResult,
    TaskError,
    evaluate,
    extract_answer_word,
    extract_choice_letter,
    extract_number,
    generate,
    get_task,
    load_records,
    numbers_match,
    summary_table,
    task_from_path,
)
from peftlab.evaluate.tasks import extract, is_correct
from peftlab.train.templates import DataError

from .conftest import VOCAB, char_tokenizer, tiny_llama

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"  # beside the repository


# --------------------------------------------------------------------------------------------------
# Math: the last number, commas removed, within 0.001


@pytest.mark.parametrize("text, number", [
    ("She pays $1,234 in total, so 1,234 it is", "1234"),
    ("The temperature falls to -15 degrees.", "-15"),
    ("Each costs 3.75, so the answer is 3.75", "3.75"),
    ("3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "14."),  # the reference's regex keeps the dot
    ("First 12 apples, then 5 more: 17", "17"),
    ("I do not know.", None),
])
def test_math_takes_the_last_number_without_commas(text, number):
    assert extract_number(text) == number


def test_math_tolerance_follows_the_reference():
    assert numbers_match("14.", "14.0")
    assert numbers_match("480", "480.0")
    assert numbers_match("1000", "1,000")  # a label with a thousands separator
    assert numbers_match("-15", "-15.0")
    assert numbers_match("0.0005", "0")
    assert numbers_match("0.001", "0")  # LLM-Adapters: abs(label - pred) <= 0.001
    assert not numbers_match("0.002", "0")
    assert not numbers_match("15", "-15")
    assert not numbers_match(None, "3")


def test_math_task_scores_only_up_to_a_second_response():
    task = get_task("gsm8k")
    output = "5 + 3 = 8. The answer is 8.\n\n### Response:\nThe answer is 2."
    assert task.extract(output) == "8."
    assert task.is_correct(task.extract(output), "8.0")
    assert not task.is_correct(task.extract("no number here"), "8.0")
    assert is_correct("math", extract("math", "so 3 + 4 = 7"), "7")  # the by-name form demo.py uses


# --------------------------------------------------------------------------------------------------
# AQuA: whole-token letters, and the reference's first-capital rule as an option


@pytest.mark.parametrize("text, ours, reference", [
    ("The answer is (C).", "C", "C"),
    ("so the answer is C", "C", "C"),
    ("Bob has 3 apples and eats 1. The answer is (D).", "D", "B"),
    ("After 2 hours: 4 km. Options (A) and (E) are too big, so the Answer Is: (B)", "B", "A"),
    ("I pick (B) over (D)", "D", "B"),  # no "answer is": the last standalone letter
    ("the answer is a number near 10", None, None),  # "a" is a word, not a choice
    ("Dunno.", None, "D"),
])
def test_aqua_letters_are_whole_tokens_unlike_the_reference(text, ours, reference):
    assert extract_choice_letter(text) == ours
    assert extract_choice_letter(text, strict_reference=True) == reference
    assert get_task("aqua").extract(text) == ours
    assert get_task("aqua-reference").extract(text) == reference
    assert get_task("aqua", strict_reference=True).extract(text) == reference


# --------------------------------------------------------------------------------------------------
# Commonsense: the first of the set's answer words, case-sensitive, as commonsense_evaluate.py


@pytest.mark.parametrize("task, output, prediction", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false. It is not true that", "false"),
    ("boolq", "True", None),  # the reference's regex is case-sensitive
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("siqa", "answer5", "answer5"),
    ("arc-easy", "the correct answer is answer4", "answer4"),
    ("ARC-Challenge", "answer1 or answer2", "answer1"),
    ("openbookqa", "the correct answer is answer2", "answer2"),
    ("hellaswag", "the correct answer is ending3", "ending3"),
    ("hellaswag", "answer3", None),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "option3", None),
])
def test_commonsense_takes_the_first_answer_word(task, output, prediction):
    task = get_task(task)
    assert task.family == "commonsense"
    assert task.extract(output) == prediction
    assert task.is_correct(prediction, prediction or "true") == (prediction is not None)


def test_answer_word_search_is_a_plain_first_match():
    assert extract_answer_word("xx option2 then option1", ("option1", "option2")) == "option2"


# --------------------------------------------------------------------------------------------------
# Tasks: names, aliases, defaults, inference from file names


def test_task_names_aliases_and_defaults():
    assert get_task("GSM8K").name == "gsm8k" and get_task("gsm8k").family == "math"
    assert get_task("math").family == "math" and get_task("SVAMP").max_new_tokens == 256
    assert get_task("AQuA").max_new_tokens == 256
    assert get_task("social-i-qa").name == get_task("siqa").name == "social_i_qa"
    assert get_task("obqa").name == "openbookqa"
    assert get_task("boolq").max_new_tokens == 32
    with pytest.raises(TaskError, match="unknown task 'gsm9k'.*gsm8k.*boolq"):
        get_task("gsm9k")


@pytest.mark.parametrize("path, task", [
    ("math/heldout_gsm8k.json", "gsm8k"),
    ("math/heldout_aqua.json", "aqua"),
    ("math/full/svamp.json", "svamp"),
    ("commonsense/boolq_test.json", "boolq"),
    ("commonsense/arc-easy_test.json", "arc-easy"),
    ("commonsense/social_i_qa_test.jsonl", "social_i_qa"),
    ("dataset/ARC-Challenge/test.json", "arc-challenge"),  # LLM-Adapters' own layout
    ("dataset/MultiArith/test.json", "multiarith"),
])
def test_task_from_file_name(path, task):
    assert task_from_path(path).name == task


def test_task_from_an_unknown_file_name_is_an_error():
    with pytest.raises(TaskError, match="train_math_3k.json.*gsm8k"):
        task_from_path("math/train_math_3k.json")


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/llm-adapters is not beside the repository")
def test_every_shared_test_file_has_a_task_that_fits_its_labels():
    files = sorted(DATA.glob("math/heldout_*.json")) + sorted(DATA.glob("math/full/*.json"))
    files += sorted(DATA.glob("commonsense/*_test.json"))
    assert len(files) >= 7
    for path in files:
        task = task_from_path(path)
        record = load_records(path)[0]
        assert {"instruction", "answer"} <= set(record), path
        assert task.label_problem(str(record["answer"]).strip()) is None, (path, record["answer"])


# --------------------------------------------------------------------------------------------------
# Records


def test_load_records_reads_json_lists_and_jsonl(tmp_path):
    records = [{"instruction": "q", "answer": "1"}, {"instruction": "r", "answer": "2"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_records(tmp_path / "a.json") == records == load_records(tmp_path / "a.jsonl")


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("  \n", "is empty"),
    ("[]", "no records"),
    ('[\n{"instruction": "q", "answer": "1"},\n{"instruction": "q" "answer": "2"}\n]', "line 3"),
    ('{"instruction": "q", "answer": "1"}\n{"instruction": "q", answer: 2}\n', "line 2"),
    ('[{"instruction": "q", "answer": "1"}, {"instruction": "q"}]', "record 1 has no 'answer'"),
    ('[{"instruction": "q", "answer": "1"}, "text"]', "record 1 is a str"),
])
def test_load_records_errors_say_where(tmp_path, text, message):
    path = tmp_path / "set.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_labels_that_cannot_fit_the_task_fail_before_generation():
    records = [{"instruction": "q", "answer": "true"}, {"instruction": "q", "answer": "answer1"}]
    with pytest.raises(DataError, match="record 1: label 'answer1' is not one of true/false"):
        evaluate(None, char_tokenizer(), records, "boolq")  # no model needed: nothing is generated
    with pytest.raises(DataError, match="record 0: label 'true' is not a number"):
        evaluate(None, char_tokenizer(), records, "gsm8k")
    with pytest.raises(DataError, match="record 0: label 'AB' is not one of A/B/C/D/E"):
        evaluate(None, char_tokenizer(), [{"instruction": "q", "answer": "AB"}], "aqua")
    with pytest.raises(DataError, match="record 0 has no 'answer'"):
        evaluate(None, char_tokenizer(), [{"instruction": "q"}], "gsm8k")


# --------------------------------------------------------------------------------------------------
# Generation

PROMPTS = ["Q: 12+7=?\nA:", "hi", "The answer is", "A much longer prompt, with several words in it:",
           "x", "Two\nlines", "Below is an instruction that describes a task.\n### Response:\n"]


def one_at_a_time(model, tokenizer, prompts, **options):
    return [generate(model, tokenizer, [p], batch_size=1, progress=False, **options)[0] for p in prompts]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_left_padded_batches_continue_each_prompt_as_if_alone(num_beams):
    model, tokenizer = tiny_llama(), char_tokenizer()
    batched = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=12, num_beams=num_beams,
                       progress=False)
    assert batched == one_at_a_time(model, tokenizer, PROMPTS, max_new_tokens=12, num_beams=num_beams)
    assert sum(len(text) for text in batched) > 4 * len(PROMPTS)  # not trivially short: the test has teeth


def test_generate_returns_new_text_up_to_eos_like_plain_generate():
    model, tokenizer = tiny_llama(), char_tokenizer()
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0, eos_token_id=2)[0, ids.shape[1]:].tolist()
        expected = tokenizer.decode(full[:full.index(2)] if 2 in full else full)
        assert generate(model, tokenizer, [prompt], max_new_tokens=10, progress=False) == [expected]


def test_generate_stops_at_the_models_eos_even_when_the_tokenizer_does_not_call_it_special():
    model, tokenizer = tiny_llama(), char_tokenizer()
    before = generate(model, tokenizer, PROMPTS, max_new_tokens=12, progress=False)
    stop = before[0][len(before[0]) // 2]  # an ordinary character the model writes mid-response
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(stop)]
    after = generate(model, tokenizer, PROMPTS, max_new_tokens=12, progress=False)
    assert after == [text.split(stop)[0] for text in before]
    assert after[0] != before[0]


def test_generate_leaves_model_and_tokenizer_as_they_were():
    model, tokenizer = tiny_llama(), char_tokenizer()
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)
    tokenizer.pad_token = None  # a tokenizer without a pad token pads with EOS
    tokenizer.padding_side = "right"  # ignored: prompts are left padded by hand
    model.train()
    assert generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=8, progress=False) == expected
    assert model.training and tokenizer.padding_side == "right" and tokenizer.pad_token is None


# --------------------------------------------------------------------------------------------------
# evaluate(): scoring, files, table; adapters unmerged and merged


def digit_model():
    """A tiny Llama that writes digits only and never stops, so every response holds a number."""
    model, tokenizer = tiny_llama(), char_tokenizer()
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-1e4)
        head.bias[tokenizer.convert_tokens_to_ids(list("0123456789"))] = 0.0
    model.lm_head = head
    return model


MATH_RECORDS = [{"instruction": f"What is {i} + {i}?", "input": "", "output": "", "answer": str(2 * i)}
                for i in range(5)]
OPTIONS = {"template": "plain", "max_new_tokens": 6, "progress": False}  # short prompts: within 128 positions


def test_evaluate_scores_writes_files_and_tabulates(tmp_path):
    model, tokenizer = digit_model(), char_tokenizer()
    outputs = evaluate(model, tokenizer, MATH_RECORDS, "gsm8k", **OPTIONS).predictions
    numbers = [int(p["output"]) for p in outputs]
    assert all(len(p["output"]) == 6 for p in outputs)
    # Records 0, 2 and 4 get the model's own number as label (one with a thousands separator), 1 and 3 a wrong one.
    records = [{**r, "answer": f"{n:,}" if i % 2 == 0 else str(n + 1)}
               for i, (r, n) in enumerate(zip(MATH_RECORDS, numbers))]
    result = evaluate(model, tokenizer, records, "gsm8k", **OPTIONS, output_dir=tmp_path)
    assert (result.task, result.correct, result.total, result.accuracy) == ("gsm8k", 3, 5, 60.0)
    assert [p["correct"] for p in result.predictions] == [True, False, True, False, True]
    assert [p["index"] for p in result.predictions] == [0, 1, 2, 3, 4]

    lines = (tmp_path / "predictions-gsm8k.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.predictions
    evaluate(model, tokenizer, records[:2], "svamp", **OPTIONS, output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gsm8k"]["accuracy"] == 60.0 and summary["gsm8k"]["max_new_tokens"] == 6
    assert summary["svamp"]["total"] == 2  # a second run adds its entry, the first stays
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluate_reads_files_and_tells_the_task_from_the_name(tmp_path):
    path = tmp_path / "heldout_gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
    result = evaluate(digit_model(), char_tokenizer(), path, **OPTIONS, limit=3, output_dir=tmp_path)
    assert (result.task, result.total) == ("gsm8k", 3)
    assert (tmp_path / "predictions-heldout_gsm8k.jsonl").is_file()
    with pytest.raises(ValueError, match="pass the task"):
        evaluate(None, char_tokenizer(), MATH_RECORDS)


def test_summary_table_rows_and_unweighted_average():
    results = {"gsm8k": EvalResult("gsm8k", 50.0, 2, 4, []), "svamp": EvalResult("svamp", 25.0, 1, 4, [])}
    assert summary_table(results).splitlines() == [
        "| set | n | correct | accuracy % |",
        "|---|---:|---:|---:|",
        "| gsm8k | 4 | 2 | 50.0 |",
        "| svamp | 4 | 1 | 25.0 |",
        "| average | 8 | 3 | 37.5 |",
    ]


def test_lora_unmerged_and_merged_give_the_same_results():
    model, tokenizer = tiny_llama(), char_tokenizer()
    peftlab.adapt(model, "lora", r=4, init="gaussian")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # B starts at zero; make the adapter change the output
    options = {"template": "plain", "max_new_tokens": 10, "batch_size": 2, "progress": False}
    unmerged = evaluate(model, tokenizer, MATH_RECORDS, "gsm8k", **options)
    with peftlab.disabled(model):
        base = evaluate(model, tokenizer, MATH_RECORDS, "gsm8k", **options)
    assert base.predictions != unmerged.predictions  # the adapter matters, so the comparison below can fail
    peftlab.merge(model)
    assert not peftlab.adapters(model)
    assert evaluate(model, tokenizer, MATH_RECORDS, "gsm8k", **options) == unmerged
