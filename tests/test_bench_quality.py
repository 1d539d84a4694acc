"""peftlab bench quality: multiple-choice framing, job planning, rows, shard merging, ranking, parity."""

from __future__ import annotations

import builtins
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.bench import leaderboard, quality
from peftlab.bench.leaderboard import ROW_KEYS, ResultsError
from peftlab.bench.quality import ChoiceQuestion, Job
from peftlab.train.templates import DataError

from .conftest import char_tokenizer, tiny_bert, tiny_llama

# --------------------------------------------------------------------------------------------------
# Multiple-choice framing

ARC = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                      "Answer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: neon\n\n"
                      "Answer format: answer1/answer2/answer3/answer4", "input": "",
       "output": "the correct answer is answer2", "answer": "answer2"}
PIQA = {"instruction": "Please choose the correct solution to the question: How do I dry a shirt?\n\n"
                       "Solution1: Hang it on a line.\n\nSolution2: Put it in the freezer.\n\n"
                       "Answer format: solution1/solution2", "answer": "solution1"}
WINOGRANDE = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                             "Sarah was a better surgeon than Maria so _ got the easier cases.\n\n"
                             "Option1: Sarah Option2: Maria Answer format: option1/option2", "answer": "option2"}
BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                        "Answer format: true/false", "answer": "false"}


def test_multiple_choice_reads_each_record_style():
    arc = quality.multiple_choice(ARC, "arc-easy")
    assert arc == ChoiceQuestion("Which gas do plants take in?", ("oxygen", "carbon dioxide", "helium", "neon"), 1,
                                 "arc-easy")
    piqa = quality.multiple_choice(PIQA, "piqa")
    assert piqa.choices == ("Hang it on a line.", "Put it in the freezer.") and piqa.label == 0
    assert piqa.question == "How do I dry a shirt?"
    wino = quality.multiple_choice(WINOGRANDE, "winogrande")  # "Answer format" on the same line as the options
    assert wino.choices == ("Sarah", "Maria") and wino.label == 1
    assert wino.question.startswith("Sarah was a better surgeon") and wino.question.endswith("easier cases.")
    boolq = quality.multiple_choice(BOOLQ, "boolq")
    assert boolq == ChoiceQuestion("is the sky blue?", ("true", "false"), 1, "boolq")


def test_multiple_choice_refuses_labels_that_name_no_choice():
    with pytest.raises(DataError, match="answer5"):
        quality.multiple_choice({**ARC, "answer": "answer5"}, "arc-easy")
    with pytest.raises(DataError, match="true/false"):
        quality.multiple_choice({**BOOLQ, "answer": "maybe"}, "boolq")


def questions_with_counts(counts, seed=0):
    rng = random.Random(seed)
    return [ChoiceQuestion(f"question {i} " + "x" * rng.randint(1, 20),
                           tuple(f"choice {j} " + "y" * rng.randint(1, 9) for j in range(n)), rng.randrange(n), "t")
            for i, n in enumerate(counts)]


def test_choice_logits_pad_missing_choices_and_the_loss_is_a_softmax_over_real_ones():
    questions = questions_with_counts([2, 4, 3])
    scores = torch.randn(9, requires_grad=True)
    logits = quality.choice_logits(scores, questions)
    assert logits.shape == (3, 4)
    assert torch.isinf(logits[0, 2:]).all() and torch.isinf(logits[2, 3]) and torch.isfinite(logits[1]).all()
    labels = quality.choice_labels(questions)
    loss = F.cross_entropy(logits, labels)
    chunks, manual = scores.split([2, 4, 3]), 0.0
    for chunk, label in zip(chunks, labels):
        manual = manual - torch.log_softmax(chunk, 0)[label]
    torch.testing.assert_close(loss, manual / 3)
    loss.backward()  # gradients reach every real choice's score
    assert (scores.grad != 0).all()


@pytest.mark.parametrize("framing", ["similarity", "pair"])
def test_scores_follow_the_choices_and_ignore_padding(framing):
    torch.manual_seed(0)
    tokenize = quality.Tokenize(char_tokenizer(), 96, torch.device("cpu"))
    encoder = tiny_bert()
    scorer = (quality.SimilarityScorer(encoder, tokenize) if framing == "similarity"
              else quality.PairScorer(encoder, tokenize, 32)).eval()
    question = questions_with_counts([4], seed=1)[0]
    order = [2, 0, 3, 1]
    shuffled = ChoiceQuestion(question.question, tuple(question.choices[i] for i in order), 0, "t")
    with torch.no_grad():
        alone = scorer([question])
        torch.testing.assert_close(scorer([shuffled]), alone[order])
        # next to longer texts the question is padded: the masked mean pooling must not notice
        crowd = questions_with_counts([3, 5], seed=2)
        crowd = [ChoiceQuestion(q.question * 3, tuple(c * 3 for c in q.choices), 0, "t") for q in crowd]
        torch.testing.assert_close(scorer([*crowd, question])[-4:], alone, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Planning and claiming


def test_plan_runs_base_then_every_method_once_before_other_rates_and_seeds():
    jobs = quality.plan_jobs("decoder", ["base", "lora", "svft"], ["peftlab", "peft"], "grid", [1, 2])
    assert jobs[0] == Job("decoder", "base", "peftlab", None, 1)
    first = [(j.method, j.impl, j.lr) for j in jobs[1:4]]
    assert first == [("lora", "peftlab", 3e-4), ("lora", "peft", 3e-4), ("svft", "peftlab", 1e-3)]  # PEFT has no svft
    assert len(jobs) == 1 + 2 * 3 * 3 and [j.seed for j in jobs[1:10]] == [1] * 9
    assert {j.lr for j in jobs if j.method == "svft"} == set(quality.lr_grid("svft"))
    best = quality.plan_jobs("decoder", ["base", "lora", "svft"], ["peftlab", "peft"], "best", [7],
                             chosen={("svft", "peftlab"): 3e-3})
    assert best == [Job("decoder", "svft", "peftlab", 3e-3, 7)]
    assert quality.learning_rates("lora", "1e-4,2e-4") == [1e-4, 2e-4]
    extended = quality.plan_jobs("decoder", ["lora", "svft", "corda"], ["peftlab"], "extend", [1],
                                 chosen={("lora", "peftlab"): 1e-3, ("svft", "peftlab"): 3e-4,
                                         ("corda", "peftlab"): 1e-4})
    assert [(j.method, j.lr) for j in extended] == [("lora", 3e-3), ("svft", 1e-4)]  # corda's best is inside
    assert quality.learning_rates("lora", "extend", 3e-3) == [1e-2]  # beyond an extension: one more step
    done = {("decoder", "lora", "peftlab", 3e-4, 1)}
    rest = quality.plan_jobs("decoder", ["lora"], ["peftlab"], "grid", [1], done=done)
    assert [j.lr for j in rest] == [1e-4, 1e-3]


def test_each_job_is_claimed_by_one_process(tmp_path):
    job = Job("encoder", "lora", "peftlab", 3e-4, 1)
    assert quality.claim(tmp_path / "claims", job)
    assert not quality.claim(tmp_path / "claims", job)
    assert quality.claim(tmp_path / "claims", Job("encoder", "lora", "peftlab", 3e-4, 2))


# --------------------------------------------------------------------------------------------------
# Rows from the real harness on tiny models, and PEFT beside peftlab


@pytest.fixture
def math_dir(tmp_path):
    rng = random.Random(0)

    def record(a, b):
        return {"instruction": f"{a}+{b}?", "input": "", "output": f"{a}+{b}={a + b}. The answer is {a + b}.",
                "answer": str(a + b)}

    folder = tmp_path / "math"
    folder.mkdir()
    (folder / "train_math_3k.json").write_text(json.dumps([record(rng.randint(1, 9), rng.randint(1, 9))
                                                           for _ in range(16)]))
    for name in quality.MATH_SETS:
        records = [record(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(2)]
        if name == "aqua":
            records = [{"instruction": "Pick one. A) 1 B) 2", "output": "The answer is A", "answer": "A"}] * 2
        (folder / f"heldout_{name}.json").write_text(json.dumps(records))
    return tmp_path


def decoder_bench(data_dir):
    settings = quality.Settings("decoder", data_dir, "tiny-llama", batch_size=8, micro_batch_size=4,
                                eval_batch_size=8, cutoff_len=64, max_new_tokens=6, template="plain")
    return quality.DecoderBench(settings, tiny_llama(), char_tokenizer())


def test_decoder_rows_have_the_schema_and_peft_gets_the_same_budget(math_dir):
    bench = decoder_bench(math_dir)
    rows = {(j.method, j.impl): bench.run(j)
            for j in quality.plan_jobs("decoder", ["base", "lora", "ia3", "prompt"], ["peftlab", "peft"], "1e-2", [3])}
    for row in rows.values():
        assert set(ROW_KEYS) <= set(row) and row["error"] is None
        assert set(row["accuracy"]) == set(quality.MATH_SETS) and row["eval_n"]["gsm8k"] == 2
        assert row["avg"] == pytest.approx(sum(row["accuracy"].values()) / 7, abs=0.01)
        assert row["wall_s"] >= 0 and row["peak_gib"] is None and row["budget"]["train_examples"] == 16
    base = rows[("base", "peftlab")]
    assert base["lr"] is None and base["trainable_params"] == 0
    lora, peft_lora = rows[("lora", "peftlab")], rows[("lora", "peft")]
    # r 8 on q k v up down of 2 layers (hidden 32, kv 16, mlp 48): the LLM-Adapters placement in both libraries
    assert lora["trainable_params"] == peft_lora["trainable_params"] == 2 * 8 * (64 + 48 + 48 + 80 + 80)
    assert (lora["steps"], lora["tokens"]) == (peft_lora["steps"], peft_lora["tokens"]) == (2, base_tokens(math_dir))
    ia3, peft_ia3 = rows[("ia3", "peftlab")], rows[("ia3", "peft")]
    assert ia3["trainable_params"] == peft_ia3["trainable_params"] == 2 * (16 + 16 + 48)  # k, v out; down in
    # IA3 starts at ones in both libraries and has no dropout: same data, order and steps give the same loss
    assert ia3["final_loss"] == pytest.approx(peft_ia3["final_loss"], abs=1e-4)
    # PEFT's prompt tuning returns logits for its virtual tokens too; trimmed, its loss is on the same tokens
    prompt, peft_prompt = rows[("prompt", "peftlab")], rows[("prompt", "peft")]
    assert prompt["trainable_params"] == peft_prompt["trainable_params"] == 20 * 32
    assert peft_prompt["tokens"] == prompt["tokens"] and math.isfinite(peft_prompt["final_loss"])


def base_tokens(data_dir) -> int:
    """Tokens of one epoch of the training file: prompt + response + EOS per record (char tokenizer, BOS-free)."""
    records = json.loads((data_dir / "math" / "train_math_3k.json").read_text())
    return sum(len(f"{r['instruction']}\n") + len(r["output"]) + 1 for r in records)


@pytest.fixture
def commonsense_dir(tmp_path):
    rng = random.Random(1)
    folder = tmp_path / "commonsense"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        records = []
        for i in range(n):
            count = rng.choice([3, 4, 5])
            items = " ".join(f"Answer{j + 1}: option {rng.randint(0, 99)}" for j in range(count))
            records.append({"instruction": f"Please choose the correct answer to the question: q{i} "
                                           f"{'z' * rng.randint(1, 30)}?\n\n{items}\n\nAnswer format: ...",
                            "answer": f"answer{rng.randint(1, count)}"})
        (folder / f"arc-easy_{split}.json").write_text(json.dumps(records))
    return tmp_path


def test_encoder_rows_and_parity(commonsense_dir):
    settings = quality.Settings("encoder", commonsense_dir, "tiny-bert", ("arc-easy",), batch_size=4, cutoff_len=96)
    bench = quality.EncoderBench(settings, tiny_bert(), char_tokenizer())
    rows = {(j.method, j.impl): bench.run(j)
            for j in quality.plan_jobs("encoder", ["base", "ia3", "prompt"], ["peftlab", "peft"], "3e-2", [5])}
    assert all(r["error"] is None and set(ROW_KEYS) <= set(r) for r in rows.values())
    base = rows[("base", "peftlab")]
    assert base["trainable_params"] == 0 and base["head_params"] == 1 and base["steps"] == 3
    ia3, peft_ia3 = rows[("ia3", "peftlab")], rows[("ia3", "peft")]
    assert ia3["trainable_params"] == peft_ia3["trainable_params"] == 2 * (32 + 32 + 48)
    assert ia3["final_loss"] == pytest.approx(peft_ia3["final_loss"], abs=1e-4)
    assert rows[("prompt", "peftlab")]["trainable_params"] == rows[("prompt", "peft")]["trainable_params"] == 20 * 32
    for row in rows.values():  # 6 test questions: a whole number of them is right
        correct = row["accuracy"]["arc-easy"] * 6 / 100
        assert row["eval_n"] == {"arc-easy": 6} and abs(correct - round(correct)) < 1e-3


# --------------------------------------------------------------------------------------------------
# Shards, merging, ranking


class FakeBench:
    """Rows without a model: the worker loop and merging are about files and claims only."""

    track = "decoder"
    budget = {"epochs": 1.0}

    def __init__(self, avg_of=None, seconds_per_job=0.0, clock=None):
        self.ran, self.avg_of, self.seconds, self.clock = [], avg_of or {}, seconds_per_job, clock

    def run(self, job):
        self.ran.append(job)
        if self.clock is not None:
            self.clock[0] += self.seconds
        return synthetic_row(job, self.avg_of.get((job.method, job.impl, job.lr, job.seed), 1.0))


def synthetic_row(job, avg, trainable=100, error=None, budget=None):
    return {"track": job.track, "method": job.method, "impl": job.impl, "seed": job.seed, "lr": job.lr,
            "trainable_params": trainable, "peak_gib": None, "wall_s": 2.0, "accuracy": {} if error else {"gsm8k": avg},
            "avg": None if error else avg, "error": error, "budget": budget or {"epochs": 1.0}}


def test_parallel_shards_run_each_job_once_and_merge(tmp_path):
    jobs = quality.plan_jobs("decoder", ["base", "lora", "dora", "ia3"], ["peftlab", "peft"], "centre", [1])
    first, second = FakeBench(), FakeBench()
    claims = tmp_path / "claims"
    # two interleaved workers: each claims whatever the other has not taken yet
    for index, job in enumerate(jobs):
        worker, stem = (first, "a") if index % 2 == 0 else (second, "b")
        quality.run_jobs(worker, [job], tmp_path / stem, "cmd " + stem, claim_dir=claims, log=lambda _: None)
        quality.run_jobs(worker, [job], tmp_path / stem, "cmd " + stem, claim_dir=claims, log=lambda _: None)
    assert sorted(j.key for j in first.ran + second.ran) == sorted(j.key for j in jobs)
    merged = leaderboard.read_results([tmp_path / "a.json", tmp_path / "b.json"])
    assert sorted(leaderboard.row_key(r) for r in merged["rows"]) == sorted(
        (j.track, j.method, j.impl, j.lr, j.seed) for j in jobs)
    assert merged["commands"] == ["cmd a", "cmd b"]


def test_merge_keeps_the_latest_result_and_never_a_failure_over_a_result():
    job = Job("decoder", "lora", "peftlab", 3e-4, 1)
    old, new = synthetic_row(job, 10.0), synthetic_row(job, 12.0)
    failed = synthetic_row(job, 0.0, error="OutOfMemoryError")
    assert leaderboard.merge_rows([old], [new])[0]["avg"] == 12.0
    assert leaderboard.merge_rows([old], [failed])[0]["avg"] == 10.0
    assert leaderboard.merge_rows([failed], [old])[0]["avg"] == 10.0
    other_budget = synthetic_row(Job("decoder", "dora", "peftlab", 3e-4, 1), 5.0, budget={"epochs": 3.0})
    with pytest.raises(ResultsError, match="epochs"):
        leaderboard.merge_rows([old], [other_budget])
    with pytest.raises(ResultsError, match="lacks"):
        leaderboard.merge_rows([{"track": "decoder", "method": "lora"}])


def ranking_rows():
    rows = [synthetic_row(Job("decoder", "base", "peftlab", None, 42), 1.5, trainable=0)]
    for lr, seed, avg in ((1e-4, 42, 10.0), (1e-4, 43, 12.0), (3e-4, 42, 15.0), (3e-4, 43, 16.0), (1e-3, 42, 14.0)):
        rows.append(synthetic_row(Job("decoder", "lora", "peftlab", lr, seed), avg, trainable=1000))
    for lr, avg in ((3e-4, 13.0), (1e-3, 17.0)):
        rows.append(synthetic_row(Job("decoder", "lora", "peft", lr, 42), avg, trainable=1000))
    rows.append(synthetic_row(Job("decoder", "ia3", "peftlab", 3e-3, 42), 6.0, trainable=50))
    rows.append(synthetic_row(Job("decoder", "prefix", "peft", 1e-2, 42), 0.0, error="RuntimeError: cache"))
    return rows


def test_leaderboard_takes_each_methods_best_rate_averaged_over_seeds():
    board = leaderboard.leaderboard(ranking_rows(), "decoder")
    assert [(e.method, e.impl, e.lr) for e in board] == [
        ("lora", "peft", 1e-3), ("lora", "peftlab", 3e-4), ("ia3", "peftlab", 3e-3), ("base", "peftlab", None)]
    lora = board[1]
    assert lora.avg == 15.5 and lora.seeds == [42, 43] and lora.spread == pytest.approx(math.sqrt(0.5))
    assert [(e.method, e.impl) for e in leaderboard.top_entries(ranking_rows(), 2, "decoder")] == [
        ("lora", "peft"), ("lora", "peftlab")]


def test_report_lists_ranks_parity_rates_and_failures(tmp_path):
    text = leaderboard.markdown({"commands": ["peftlab bench quality --track decoder"], "rows": ranking_rows()})
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[1] for line in table] == ["lora", "lora", "ia3", "base"]
    assert "15.5 ± 0.7" in table[1]
    assert "| lora | 1,000 | 1,000 | 15.5 | 17.0 | -1.5 |" in text
    assert "| lora | peftlab | 11.0 | 15.5 | 14.0 |" in text  # mean over seeds at each rate
    assert "| decoder | prefix | peft | 0.01 | 42 | RuntimeError: cache |" in text


def test_plot_is_skipped_cleanly_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    written = leaderboard.write_report({"commands": ["c"], "rows": ranking_rows()}, tmp_path / "q", "c")
    assert [p.name for p in written] == ["q.json", "q.md"] and not (tmp_path / "q.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert leaderboard.plot(ranking_rows(), tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_time_budget_starts_no_job_that_would_overrun(tmp_path):
    clock = [0.0]
    bench = FakeBench(seconds_per_job=10.0, clock=clock)
    jobs = quality.plan_jobs("decoder", ["lora", "dora", "ia3", "ssf"], ["peftlab"], "centre", [1])
    quality.run_jobs(bench, jobs, tmp_path / "t", "c", time_budget=25.0, log=lambda _: None, clock=lambda: clock[0])
    assert [j.method for j in bench.ran] == ["lora", "dora"]  # a third would end at 30 s


def test_cli_merges_shards_and_reruns_the_best(tmp_path, capsys):
    rows = ranking_rows()
    leaderboard.write_results(tmp_path / "a.json", "run a", ["run a"], rows[:4])
    leaderboard.write_results(tmp_path / "b.json", "run b", ["run b"], rows[4:])
    assert quality.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         "--output", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["commands"] == ["run a", "run b"] and len(merged["rows"]) == len(rows)
    assert merged["command"].startswith("peftlab bench quality --merge")
    ns = quality.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--track", "decoder", "--best-from", str(tmp_path / "all.json"), "--top", "2", "--lrs", "best"])
    chosen = quality._chosen(ns)
    assert chosen == {("lora", "peft"): 1e-3, ("lora", "peftlab"): 3e-4}
    assert quality.main(["--track", "decoder", "--top", "1"]) == 2
    assert "need --best-from" in capsys.readouterr().err


def test_workers_that_differ_in_their_files_only_are_listed_once(tmp_path):
    worker = "peftlab bench quality --track decoder --lrs grid --claim-dir /c --output /s/A-{} --skip-done p q"
    for i in (1, 2):
        leaderboard.write_results(tmp_path / f"{i}.json", worker.format(i), [worker.format(i)], ranking_rows()[i:i + 1])
    merged = leaderboard.read_results([tmp_path / "1.json", tmp_path / "2.json"])
    assert merged["commands"] == ["peftlab bench quality --track decoder --lrs grid --claim-dir <...> --output <...> "
                                  "--skip-done <...>"]
    assert leaderboard.canonical_command("peftlab bench quality --merge a.json b.json --output o") == \
        "peftlab bench quality --merge <...> --output <...>"


def test_peft_gets_the_layers_peftlab_adapts():
    model = tiny_llama()
    config = quality.peft_config("lora", "decoder", model)
    assert set(config.target_modules) == set(quality.adapted_paths(model, "lora", quality.method_options("decoder",
                                                                                                         "lora")))
    assert len(config.target_modules) == 2 * 5 and config.r == 8 and config.lora_alpha == 16
    ia3 = quality.peft_config("ia3", "decoder", model)
    assert set(ia3.feedforward_modules) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    bert = tiny_bert()
    encoder_lora = quality.peft_config("lora", "encoder", bert)
    assert sum(".output.dense" in p for p in encoder_lora.target_modules) == 2  # the MLP output, not attention's
    with pytest.raises(peftlab.PeftlabError, match="biases only"):
        quality.peft_config("bitfit", "decoder", model)


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    # wide enough for the SVD methods' rank 128 and deep enough for MoS's shared pools (7+ layers)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("method", peftlab.methods())
def test_every_method_trains_with_the_decoder_tracks_options(method):
    """The sweep's options build every method on a Gemma 3 and a training step runs without task ids."""
    model = _tiny_gemma3()
    batch = {"input_ids": torch.randint(0, 96, (2, 12))}
    peftlab.adapt(model, method, calibration=[batch], **quality.method_options("decoder", method))
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]  # other tasks': None
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _tiny_minilm():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # MiniLM-L6's depth and width (6 layers of 384: MoS's pools scale with depth), a narrow MLP for speed
    config = BertConfig(vocab_size=96, hidden_size=384, intermediate_size=512, num_hidden_layers=6,
                        num_attention_heads=6, max_position_embeddings=64)
    return BertModel(config)


@pytest.mark.parametrize("method", peftlab.methods())
def test_every_method_trains_with_the_encoder_tracks_options(method):
    model = _tiny_minilm()
    batch = {"input_ids": torch.randint(0, 96, (2, 12))}
    peftlab.adapt(model, method, calibration=[batch], **quality.method_options("encoder", method))
    model(**batch).last_hidden_state.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
