"""Continual learning: forgetting under each strategy, the EWC Fisher and penalty, the metrics, the CLI mode."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import peftlab
from peftlab.cli import main
from peftlab.evaluate import TaskError, evaluate
from peftlab.train.continual import (
    ContinualError,
    ContinualTask,
    EWCPenalty,
    ExactMatch,
    continual_metrics,
    diagonal_fisher,
    kept_count,
    load_config,
    run_continual,
    scoring_task,
)
from peftlab.train.data import tokenize
from peftlab.train.templates import Example

from .conftest import VOCAB, char_tokenizer

# Three tasks of eight one-character prompts each. The prompts differ between tasks, but each task answers
# with two letters of its own (x/y, u/v, p/q, alternating over its prompts): tuning on a later task teaches
# the adapter to answer every prompt with the later letters, which is where the tasks conflict.
TASK_KEYS = ("ABCDEFGH", "IJKLMNOP", "QRSTUVWX")
TASK_ANSWERS = ("xy", "uv", "pq")

SETTINGS = dict(model="toy", method="lora", method_options={"r": 4}, max_steps=80, batch_size=8, micro_batch_size=8,
                lr=5e-3, warmup_steps=0, schedule="linear", cutoff_len=16, template="plain", log_every=1000, seed=42,
                ewc_lambda=3e5, replay_size=4, eval_max_new_tokens=2)


def learnable_llama(seed: int = 0):
    """conftest's tiny Llama with a larger random init: with the default 0.02 the frozen output layer keeps
    the loss near 4.3 nats whatever the adapter does, and answers flip on noise-sized logit differences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def task_records(index: int) -> list[dict]:
    letters = TASK_ANSWERS[index]
    return [{"prompt": key, "completion": letters[i % 2], "answer": letters[i % 2]}
            for i, key in enumerate(TASK_KEYS[index])]


def write_tasks(folder, count: int = 3, **settings) -> str:
    """Task files t1.json ... and a tasks file naming them (relative to it); returns the tasks file."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for index in range(count):
        (folder / f"t{index + 1}.json").write_text(json.dumps(task_records(index)))
        tasks.append({"name": f"t{index + 1}", "train": f"t{index + 1}.json", "eval": f"t{index + 1}.json"})
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, **settings, "tasks": tasks}))
    return str(path)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The same three-task sequence under each strategy, from the same model and seed."""
    folder = tmp_path_factory.mktemp("continual")
    tasks_file = write_tasks(folder / "data")
    results = {}
    for strategy in ("sequential", "ewc", "replay"):
        config = load_config(tasks_file, {"output": str(folder / strategy), "strategy": strategy})
        results[strategy] = run_continual(config, learnable_llama(), char_tokenizer(), progress=False)
    return folder, results


# -------------------------------------------------------------------------------------------- strategies


def test_sequential_tuning_forgets_and_ewc_and_replay_forget_less(outcomes):
    _, results = outcomes
    for result in results.values():
        print(f"\n{result.table()}")
    sequential, ewc, replay = (results[s].metrics for s in ("sequential", "ewc", "replay"))
    assert sequential["average_forgetting"] >= 75 and sequential["bwt"] <= -75
    for kept in (ewc, replay):
        assert kept["average_forgetting"] <= sequential["average_forgetting"] - 30
        assert kept["bwt"] >= sequential["bwt"] + 30
        assert kept["average_accuracy"] >= sequential["average_accuracy"] + 20


def test_every_task_is_learnt_when_it_is_trained(outcomes):
    _, results = outcomes
    for strategy in ("sequential", "replay"):
        accuracy = results[strategy].accuracy
        assert all(accuracy[i][i] == 100.0 for i in range(3)), accuracy
    # Before its turn a task is not known: its letters are never the answer.
    assert all(results["sequential"].accuracy[i][j] == 0.0 for i in range(3) for j in range(i + 1, 3))


def test_replay_trains_on_the_task_and_the_kept_records_of_earlier_tasks(outcomes):
    folder, results = outcomes
    replay = folder / "replay"
    assert not (replay / "01-t1" / "train_with_replay.json").exists()
    for task, expected in (("02-t2", 8 + 4), ("03-t3", 8 + 4 + 4)):  # 4 kept of each earlier task
        records = json.loads((replay / task / "train_with_replay.json").read_text())
        assert len(records) == expected
        assert records[:8] == json.loads((folder / "data" / f"t{task[1]}.json").read_text())
    assert [t.get("replay_kept") for t in results["replay"].training] == [4, 4, None]
    assert (kept_count(4, 8), kept_count(0.25, 8), kept_count(0.1, 8), kept_count(20, 8)) == (4, 2, 1, 8)


def test_results_files_and_adapters(outcomes):
    folder, results = outcomes
    run = folder / "ewc"
    saved = json.loads((run / "results.json").read_text())
    assert saved["accuracy"] == results["ewc"].accuracy and saved["metrics"] == results["ewc"].metrics
    assert saved["scoring"] == {"t1": "exact", "t2": "exact", "t3": "exact"}
    assert (run / "results.md").read_text() == results["ewc"].table() + "\n"
    assert [t["fisher_mean"] > 0 for t in saved["training"][:2]] == [True, True]
    assert "fisher_mean" not in saved["training"][2]  # nothing comes after the last task to protect it from
    for task in ("01-t1", "02-t2", "03-t3"):
        assert (run / task / "adapter_model.safetensors").is_file()
        assert {p.name for p in (run / task / "eval").iterdir()} == {
            "summary.json", "predictions-t1.jsonl", "predictions-t2.jsonl", "predictions-t3.jsonl"}
    # The adapter left after the last task is the run's adapter: it reloads and scores as it did.
    model = peftlab.load(learnable_llama(), run)
    rescored = evaluate(model, char_tokenizer(), task_records(2), ExactMatch(), max_new_tokens=2, progress=False)
    assert rescored.accuracy == results["ewc"].accuracy[2][2]


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_follow_their_formulas_on_a_hand_made_matrix():
    accuracy = [[90.0, 10.0, 5.0],
                [60.0, 80.0, 20.0],
                [70.0, 40.0, 85.0]]
    metrics = continual_metrics(accuracy)
    assert metrics["average_accuracy"] == pytest.approx((70 + 40 + 85) / 3)
    assert metrics["bwt"] == pytest.approx(((70 - 90) + (40 - 80)) / 2)  # -30
    # f_j = max over the rows before the last of column j, minus the last row
    assert metrics["forgetting"] == pytest.approx([90 - 70, 80 - 40])
    assert metrics["average_forgetting"] == pytest.approx(30.0)
    single = continual_metrics([[55.0]])
    assert single == {"average_accuracy": 55.0, "bwt": None, "forgetting": [], "average_forgetting": None}
    with pytest.raises(ContinualError, match="square"):
        continual_metrics([[1.0, 2.0]])


# ------------------------------------------------------------------------------------------------- EWC


def _sequences(count: int = 4):
    examples = [Example(TASK_KEYS[0][i], TASK_ANSWERS[0][i % 2], None, i) for i in range(count)]
    return tokenize(examples, char_tokenizer(), cutoff_len=16)


def test_fisher_is_the_mean_squared_gradient_non_negative_and_zero_where_no_gradient_reaches():
    model = peftlab.adapt(learnable_llama(), "lora", r=2, dropout=0.1)
    sequences = _sequences()
    fisher = diagonal_fisher(model, sequences, pad_id=0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == names and all((f >= 0).all() for f in fisher.values())
    # LoRA's B starts at zero, so no gradient reaches any A: their Fisher is exactly zero.
    a_names = [n for n in names if n.endswith("lora_A")]
    assert a_names and all(fisher[n].abs().max() == 0 for n in a_names)
    assert all(fisher[n].sum() > 0 for n in names if n.endswith("lora_B"))
    assert model.training is False  # left as it was (eval: no dropout noise in the estimate)
    # One entry recomputed by hand: the mean over examples of the squared gradient of each mean token loss.
    name = next(n for n in names if n.endswith("lora_B"))
    param = dict(model.named_parameters())[name]
    squares = []
    for s in sequences:
        ids, labels = torch.tensor([s.input_ids]), torch.tensor([s.labels])
        squares.append(torch.autograd.grad(model(input_ids=ids, labels=labels).loss, param)[0].square())
    assert torch.allclose(fisher[name], torch.stack(squares).mean(0), rtol=1e-5, atol=1e-12)


def test_fisher_of_a_parameter_outside_the_graph_is_zero():
    model = peftlab.adapt(learnable_llama(), "lora", r=2)
    unused = torch.nn.Parameter(torch.ones(3))
    model.register_parameter("unused", unused)
    fisher = diagonal_fisher(model, _sequences(2), pad_id=0)
    assert torch.equal(fisher["unused"], torch.zeros(3))


def test_ewc_penalty_sums_the_quadratics_of_all_consolidated_tasks():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    names = ("weight", "bias")
    penalty = EWCPenalty(strength=7.0)
    assert penalty(model) is None  # nothing consolidated yet: no term
    tasks = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        fisher = {n: torch.rand_like(getattr(model, n)) * (torch.rand_like(getattr(model, n)) > 0.3) for n in names}
        tasks.append((fisher, {n: getattr(model, n).detach().clone() for n in names}))
        penalty.consolidate(model, fisher)
    assert penalty(model).item() == pytest.approx(_explicit(model, tasks, 7.0).item(), rel=1e-4, abs=1e-4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ours = torch.autograd.grad(penalty(model), list(model.parameters()))
    reference = torch.autograd.grad(_explicit(model, tasks, 7.0), list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(ours, reference))
    single = EWCPenalty(strength=3.0)
    single.consolidate(model, tasks[0][0])
    assert single(model).item() == pytest.approx(0.0, abs=1e-6)  # at the anchor of its only task


def _explicit(model, tasks, strength):
    return strength / 2 * sum((f[n] * (getattr(model, n) - anchor[n]).square()).sum()
                              for f, anchor in tasks for n in f)


# -------------------------------------------------------------------------------------------- scoring


def test_scoring_is_named_or_told_from_the_file_else_exact(tmp_path):
    def task(eval_name, eval_task=None):
        return ContinualTask("x", tmp_path / "train.json", tmp_path / eval_name, eval_task)

    assert scoring_task(task("gsm8k_test.json")).name == "gsm8k"
    assert scoring_task(task("history.json")).name == "exact"
    assert scoring_task(task("history.json", "boolq")).name == "boolq"
    exact = ExactMatch()
    assert exact.is_correct(exact.extract(" the cat sat \n"), "the cat sat")
    assert not exact.is_correct(exact.extract("the cat sat."), "the cat sat")


# ------------------------------------------------------------------------------------------ tasks file


def test_tasks_file_mistakes_are_named(tmp_path):
    tasks_file = write_tasks(tmp_path / "ok", count=2, output=str(tmp_path / "run"))
    with pytest.raises(ContinualError, match="unknown setting.*learning_rate"):
        load_config(_edit(tasks_file, learning_rate=1.0))
    with pytest.raises(ContinualError, match="drop 'data'"):
        load_config(_edit(tasks_file, data="t1.json"))
    with pytest.raises(ContinualError, match="strategy must be one of"):
        load_config(tasks_file, sets={"strategy": "gem"})
    with pytest.raises(ContinualError, match="task t2: train file .*nope.json does not exist"):
        load_config(_edit(tasks_file, task={"train": "nope.json"}))
    with pytest.raises(ContinualError, match="repeated: t1"):
        load_config(_edit(tasks_file, task={"name": "t1"}))
    with pytest.raises(ContinualError, match="unknown key.*steps"):
        load_config(_edit(tasks_file, task={"steps": 3}))
    with pytest.raises(TaskError, match="unknown task 'grammar'"):
        load_config(_edit(tasks_file, task={"eval_task": "grammar"}))
    with pytest.raises(ContinualError, match="ewc_lambda must be a number, got 'many'"):
        load_config(_edit(tasks_file, ewc_lambda="many"))
    config = load_config(tasks_file, {"lr": 0.5}, {"strategy": "replay", "r": 8, "replay_size": 0.5})
    assert (config.base.lr, config.settings.strategy, config.settings.replay_size) == (0.5, "replay", 0.5)
    assert config.base.method_options == {"r": 8}
    # YAML reads 3e5 and 1e-3 (no dot) as strings; they are numbers all the same.
    config = load_config(_edit(tasks_file, ewc_lambda="3e5", lr="1e-3", max_steps="7"))
    assert (config.settings.ewc_lambda, config.base.lr, config.base.max_steps) == (3e5, 1e-3, 7)


def _edit(tasks_file, task=None, **settings):
    """A copy of the tasks file with ``settings`` added and the second task's keys replaced by ``task``."""
    data = yaml.safe_load(open(tasks_file).read())
    data.update(settings)
    data["tasks"][1].update(task or {})
    path = tasks_file.replace("tasks.yaml", "edited.yaml")
    with open(path, "w") as handle:
        handle.write(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_continual_mode_trains_scores_and_writes_results(tmp_path, capsys):
    model_dir = tmp_path / "model"
    learnable_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    tasks_file = write_tasks(tmp_path / "data", count=2, model=str(model_dir), output=str(tmp_path / "unused"),
                             strategy="sequential", max_steps=3)
    out = tmp_path / "run"
    code = main(["train", "--continual", tasks_file, "--output", str(out), "--lr", "0.01",
                 "--set", "strategy=ewc", "--set", "r=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| after \\ on | t1 | t2 |" in printed and "| ewc |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"] == "ewc" and results["tasks"] == ["t1", "t2"]
    assert len(results["accuracy"]) == 2 and all(len(row) == 2 for row in results["accuracy"])
    assert [t["steps"] for t in results["training"]] == [3, 3]
    config = json.loads((out / "continual_config.json").read_text())
    assert config["base"]["lr"] == 0.01 and config["base"]["method_options"] == {"r": 2}
    assert peftlab.adapters(peftlab.load(learnable_llama(), out))["default"].r == 2
    assert (out / "02-t2" / "adapter_config.json").is_file()
    assert main(["train", "--continual", tasks_file, "--data", "x.json"]) == 2
    assert "drop --data" in capsys.readouterr().err
