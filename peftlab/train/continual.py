"""Continual learning: one adapter trained over a sequence of tasks, scored on every task after each.

This is the setting of CL^2GEC (arXiv 2509.13672): tasks (there, academic disciplines) arrive one after
another, the same adapter keeps training, and the question is how much of the earlier tasks it keeps.

Strategies:

* ``sequential``: plain sequential tuning; each task starts from the adapter the previous one left.
* ``ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017). After task k the diagonal Fisher
  F_k of the trainable (adapter) parameters is estimated on task k's training data: the mean over
  examples of the squared gradient of the example's mean token loss. Training then adds
  ``ewc_lambda / 2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` over all finished tasks k, through
  the Trainer's ``extra_loss`` hook.
* ``replay``: after each task, ``replay_size`` of its training records are kept (a count, or a
  fraction of the task when below 1); every later task trains on its own records plus all kept ones.

After each task i the adapter is evaluated on every task j (``peftlab.evaluate``), giving the accuracy
matrix R[i][j]. With T tasks: average accuracy = mean_j R[T][j]; backward transfer BWT =
mean_{j<T} (R[T][j] - R[j][j]); forgetting of task j<T: f_j = max_{i<T} R[i][j] - R[T][j].

Files in the output directory: one folder per task (``01-<name>``: the Trainer's adapter, metrics and
loss plot after that task, the replay-mixed training data, ``eval/`` predictions for every task),
the final adapter itself, ``results.json`` and ``results.md``. docs/continual.md describes the
tasks file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import peftlab
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_atomically, write_json
from peftlab.evaluate import evaluate
from peftlab.evaluate.tasks import Task, TaskError, get_task, scored_part, task_from_path

from .data import collate, load_examples, read_records, tokenize
from .loop import TrainArgs, Trainer

STRATEGIES = ("sequential", "ewc", "replay")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names folders and prediction files
_TASK_KEYS = ("name", "train", "eval", "eval_task", "epochs", "max_steps")


class ContinualError(PeftlabError, ValueError):
    """A tasks file or a continual setting is unusable."""


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ContinualTask:
    name: str
    train: Path
    eval: Path
    eval_task: str | None = None  # a peftlab.evaluate task or "exact"; None: told from the eval file's name
    epochs: float | None = None  # overrides the run's epochs for this task
    max_steps: int | None = None  # overrides the run's max_steps for this task


@dataclass
class ContinualSettings:
    """The settings a continual run has on top of TrainArgs."""

    strategy: str = "sequential"
    ewc_lambda: float = 1000.0
    ewc_samples: int = 64  # examples per task for the Fisher estimate; 0: all
    replay_size: float = 0.1  # kept per finished task: a count when >= 1, else a fraction of the task
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 0  # 0: the scoring rule's default
    eval_limit: int = 0  # 0: every eval record

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ContinualError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.ewc_lambda < 0 or self.ewc_samples < 0 or self.eval_limit < 0 or self.eval_max_new_tokens < 0:
            raise ContinualError("ewc_lambda, ewc_samples, eval_limit and eval_max_new_tokens cannot be negative")
        if self.strategy == "replay" and self.replay_size <= 0:
            raise ContinualError(f"replay needs replay_size > 0, got {self.replay_size}")
        if self.eval_batch_size < 1:
            raise ContinualError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@dataclass
class ContinualConfig:
    base: TrainArgs  # every task's training settings; ``data`` is filled in per task
    settings: ContinualSettings
    tasks: list[ContinualTask]


def setting_names() -> set[str]:
    """Every key a tasks file (or ``--set``) may hold besides ``tasks`` and ``method_options``."""
    return (TrainArgs.fields() - {"data", "resume"}) | ContinualSettings.fields()


def load_config(path: str | Path, flags: dict[str, Any] | None = None,
                sets: dict[str, Any] | None = None) -> ContinualConfig:
    """The run a tasks file describes; ``flags`` (setting -> value) and then ``sets`` override it.

    A key of ``sets`` that is no setting is a method option, as with ``peftlab train --set``. Task
    files are found relative to the tasks file's folder.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ContinualError(f"cannot read tasks file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ContinualError(f"tasks file {path} must be a mapping of settings with a 'tasks' list")
    settings = dict(data)
    tasks = [_task(entry, index, path.parent) for index, entry in enumerate(settings.pop("tasks", None) or [])]
    if not tasks:
        raise ContinualError(f"tasks file {path} lists no tasks")
    _check_unique([t.name for t in tasks])
    options = dict(settings.pop("method_options", None) or {})
    settings.update(flags or {})
    known = setting_names()
    for key, value in (sets or {}).items():
        (settings if key in known else options)[key] = value
    if "data" in settings:
        raise ContinualError(f"{path}: each task names its own train and eval files; drop 'data'")
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ContinualError(f"unknown setting(s) {', '.join(unknown)} in {path}; settings: {', '.join(sorted(known))}")
    missing = [key for key in ("model", "output") if not settings.get(key)]
    if missing:
        raise ContinualError(f"continual training needs {' and '.join(missing)} (in {path} or as flags)")
    own = _numbers({k: settings.pop(k) for k in list(settings) if k in ContinualSettings.fields()}, ContinualSettings)
    base = TrainArgs(**_numbers(settings, TrainArgs), data="", method_options=options)
    config = ContinualConfig(base, ContinualSettings(**own), tasks)
    config.base.validate()
    config.settings.validate()
    return config


def _numbers(settings: dict[str, Any], kind: type) -> dict[str, Any]:
    """Numeric settings given as text made numbers: YAML reads ``3e5`` (no dot) as a string."""
    defaults = {f.name: f.default for f in dataclasses.fields(kind)}
    converted = dict(settings)
    for key, value in settings.items():
        default = defaults.get(key)
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                converted[key] = float(value) if isinstance(default, float) else int(value)
            except ValueError:
                raise ContinualError(f"setting {key} must be a number, got {value!r}") from None
    return converted


def _task(entry: Any, index: int, folder: Path) -> ContinualTask:
    if not isinstance(entry, dict):
        raise ContinualError(f"task {index + 1} must be a mapping with name, train and eval")
    unknown = sorted(set(entry) - set(_TASK_KEYS))
    missing = [key for key in ("name", "train", "eval") if not entry.get(key)]
    if unknown or missing:
        problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
        raise ContinualError(f"task {index + 1} ({entry.get('name', 'unnamed')}): {problem}; keys: "
                             f"{', '.join(_TASK_KEYS)}")
    name = str(entry["name"])
    if not _TASK_NAME.fullmatch(name):
        raise ContinualError(f"task name {name!r} must be letters, digits, . _ - (it names files)")
    files = {key: folder / Path(str(entry[key])).expanduser() for key in ("train", "eval")}
    for key, file in files.items():
        if not file.is_file():
            raise ContinualError(f"task {name}: {key} file {file} does not exist")
    try:
        epochs = None if entry.get("epochs") is None else float(entry["epochs"])
        max_steps = None if entry.get("max_steps") is None else int(entry["max_steps"])
    except (TypeError, ValueError):
        raise ContinualError(f"task {name}: epochs must be a number and max_steps an integer") from None
    eval_task = None if entry.get("eval_task") is None else str(entry["eval_task"])
    if eval_task not in (None, "exact"):
        get_task(eval_task)  # an unknown name fails now, not after the first task has trained
    return ContinualTask(name, files["train"], files["eval"], eval_task, epochs, max_steps)


def _check_unique(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ContinualError(f"task names must differ; repeated: {', '.join(repeated)}")


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class ExactMatch(Task):
    """Correct when the response, stripped, is the label: for tasks whose answer is a whole text
    (a corrected sentence) rather than a number or a choice."""

    name: str = "exact"
    family: str = "exact"
    max_new_tokens: int = 128

    def extract(self, output: str) -> str | None:
        return scored_part(output)

    def is_correct(self, prediction: str | None, label: str) -> bool:
        return prediction == label.strip()

    def label_problem(self, label: str) -> str | None:
        return None


def scoring_task(task: ContinualTask) -> Task:
    """The rule ``task`` is scored by: its ``eval_task``, else the eval file's name, else exact match."""
    if task.eval_task is not None:
        return ExactMatch() if task.eval_task == "exact" else get_task(task.eval_task)
    try:
        return task_from_path(task.eval)
    except TaskError:
        return ExactMatch()


# --------------------------------------------------------------------------------------------------
# Metrics


def continual_metrics(accuracy: list[list[float]]) -> dict[str, Any]:
    """Average accuracy, BWT and forgetting of an accuracy matrix R[i][j] (after task i, on task j).

    BWT and forgetting need at least two tasks (None otherwise); forgetting has one value per task
    but the last.
    """
    count = len(accuracy)
    if count == 0 or any(len(row) != count for row in accuracy):
        raise ContinualError(f"the accuracy matrix must be square and non-empty, got {accuracy}")
    last = accuracy[-1]
    forgetting = [max(accuracy[i][j] for i in range(count - 1)) - last[j] for j in range(count - 1)]
    return {
        "average_accuracy": sum(last) / count,
        "bwt": sum(last[j] - accuracy[j][j] for j in range(count - 1)) / (count - 1) if count > 1 else None,
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else None,
    }


# --------------------------------------------------------------------------------------------------
# EWC


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: torch.nn.Module, sequences, pad_id: int) -> dict[str, torch.Tensor]:
    """Mean over ``sequences`` of each trainable parameter's squared gradient of the sequence's mean
    token loss (the empirical Fisher). Parameters the loss does not reach get zeros."""
    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the Fisher of the model as it predicts, without dropout noise
    try:
        for sequence in sequences:
            batch = {k: v.to(device) for k, v in collate([sequence], pad_id).items()}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    fisher[name] += grad.float().square()
    finally:
        model.train(was_training)
    return {name: f / max(len(sequences), 1) for name, f in fisher.items()}


class EWCPenalty:
    """``strength / 2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` over the consolidated tasks k.

    The per-task quadratics are kept summed as one: sum_k F_k (theta - a_k)^2 =
    F (theta - m)^2 + c with F = sum_k F_k, m = sum_k F_k a_k / F and a constant c, so memory and
    cost do not grow with the number of tasks.
    """

    def __init__(self, strength: float):
        self.strength = strength
        self.weight: dict[str, torch.Tensor] = {}  # F
        self.center: dict[str, torch.Tensor] = {}  # m
        self.constant = 0.0  # c

    def consolidate(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        """Add the current task: its Fisher and the parameters as they are now (theta*)."""
        params = dict(model.named_parameters())
        for name, f in fisher.items():
            anchor = params[name].detach().float()
            old_weight = self.weight.get(name, torch.zeros_like(f))
            old_center = self.center.get(name, anchor)
            weight = old_weight + f
            center = torch.where(weight > 0, (old_weight * old_center + f * anchor) / weight.clamp_min(1e-30), anchor)
            before = old_weight * old_center.square() + f * anchor.square() - weight * center.square()
            self.constant += float(before.sum())
            self.weight[name], self.center[name] = weight, center

    def __call__(self, model: torch.nn.Module) -> torch.Tensor | None:
        if not self.weight:
            return None
        params = dict(model.named_parameters())
        total = sum((self.weight[n] * (params[n].float() - self.center[n]).square()).sum() for n in self.weight)
        return 0.5 * self.strength * (total + self.constant)


# --------------------------------------------------------------------------------------------------
# Replay


def kept_count(replay_size: float, available: int) -> int:
    """How many of a finished task's ``available`` records replay keeps."""
    wanted = replay_size if replay_size >= 1 else math.ceil(replay_size * available)
    return min(int(wanted), available)


def replay_sample(records: list[dict], replay_size: float, seed: int) -> list[dict]:
    return random.Random(seed).sample(records, kept_count(replay_size, len(records)))


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class ContinualResult:
    strategy: str
    tasks: list[str]
    accuracy: list[list[float]]  # R[i][j], percent
    metrics: dict[str, Any]
    scoring: dict[str, str]  # task -> scoring rule
    training: list[dict[str, Any]] = field(default_factory=list)  # per task: steps, loss, seconds, examples

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Markdown: the accuracy matrix, then the summary metrics and each task's forgetting."""
        head = "| after \\ on | " + " | ".join(self.tasks) + " |"
        rows = [head, "|---|" + "---:|" * len(self.tasks)]
        rows += [f"| {name} | " + " | ".join(f"{a:.1f}" for a in row) + " |"
                 for name, row in zip(self.tasks, self.accuracy)]
        m = self.metrics
        rows += ["", "| strategy | average accuracy | BWT | average forgetting |", "|---|---:|---:|---:|",
                 f"| {self.strategy} | {m['average_accuracy']:.1f} | {_number(m['bwt'])} | "
                 f"{_number(m['average_forgetting'])} |"]
        if m["forgetting"]:
            rows += ["", "| | " + " | ".join(self.tasks[:-1]) + " |", "|---|" + "---:|" * len(m["forgetting"]),
                     "| forgetting | " + " | ".join(f"{f:.1f}" for f in m["forgetting"]) + " |"]
        return "\n".join(rows)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def run_continual(config: ContinualConfig, model=None, tokenizer=None, progress: bool = True) -> ContinualResult:
    """Train ``config``'s tasks in order with its strategy; evaluate on every task after each."""
    return _ContinualRun(config, model, tokenizer, progress).run()


class _ContinualRun:
    def __init__(self, config: ContinualConfig, model, tokenizer, progress: bool):
        if model is None:
            from peftlab.models import load_model

            model, tokenizer = load_model(config.base.model)
        self.config, self.model, self.tokenizer, self.progress = config, model, tokenizer, progress
        self.output = Path(config.base.output)
        self.scoring = {t.name: scoring_task(t) for t in config.tasks}
        self.penalty = EWCPenalty(config.settings.ewc_lambda) if config.settings.strategy == "ewc" else None
        self.memory: list[dict] = []  # replayed records of the finished tasks

    def run(self) -> ContinualResult:
        self.output.mkdir(parents=True, exist_ok=True)
        write_json(self.output / "continual_config.json", _jsonable(dataclasses.asdict(self.config)))
        torch.manual_seed(self.config.base.seed)  # dropout across all tasks replays from here
        accuracy, training, trainer = [], [], None
        for index, task in enumerate(self.config.tasks):
            folder = self.output / f"{index + 1:02d}-{task.name}"
            trainer = self._trainer(index, task, folder)
            result = trainer.run()
            record = {"task": task.name, "steps": result.steps, "examples": len(trainer.train_set),
                      "final_loss": result.final_loss, "seconds": result.seconds}
            if index + 1 < len(self.config.tasks):  # what a strategy keeps of the last task would go unused
                record.update(self._after_task(index, task, trainer))
            training.append(record)
            accuracy.append([self._accuracy(other, folder / "eval") for other in self.config.tasks])
        peftlab.save(self.model, self.output, name=trainer.saved_names)
        result = ContinualResult(self.config.settings.strategy, [t.name for t in self.config.tasks], accuracy,
                                 continual_metrics(accuracy), {n: s.name for n, s in self.scoring.items()}, training)
        write_json(self.output / "results.json", result.to_json())
        table = result.table() + "\n"
        write_atomically(self.output / "results.md", lambda tmp: tmp.write_text(table, encoding="utf-8"))
        return result

    def _trainer(self, index: int, task: ContinualTask, folder: Path) -> Trainer:
        args = dataclasses.replace(self.config.base, data=str(self._training_data(task, folder)), output=str(folder))
        if task.max_steps is not None:
            args.max_steps = task.max_steps
        elif task.epochs is not None:
            args.epochs, args.max_steps = task.epochs, 0
        # From the second task on the adapter that exists keeps training: nothing new is attached.
        keep_adapters = None if index == 0 else (lambda model: None)
        return Trainer(args, self.model, self.tokenizer, self.progress, extra_loss=self.penalty, attach=keep_adapters)

    def _training_data(self, task: ContinualTask, folder: Path) -> Path:
        if not self.memory:
            return task.train
        records = read_records(task.train) + self.memory
        folder.mkdir(parents=True, exist_ok=True)
        mixed = folder / "train_with_replay.json"
        write_atomically(mixed, lambda tmp: tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8"))
        return mixed

    def _after_task(self, index: int, task: ContinualTask, trainer: Trainer) -> dict[str, Any]:
        """Keep what the strategy needs of the finished task; returns what is worth recording of it."""
        settings, seed = self.config.settings, self.config.base.seed + index
        if settings.strategy == "replay":
            kept = replay_sample(read_records(task.train), settings.replay_size, seed)
            self.memory += kept
            return {"replay_kept": len(kept)}
        if settings.strategy == "ewc":
            sequences = self._task_sequences(task)
            if settings.ewc_samples and len(sequences) > settings.ewc_samples:
                sequences = random.Random(seed).sample(sequences, settings.ewc_samples)
            fisher = diagonal_fisher(self.model, sequences, trainer.pad_id)
            self.penalty.consolidate(self.model, fisher)
            values = torch.cat([f.flatten() for f in fisher.values()])
            # The Fisher's scale sets the useful range of ewc_lambda: recorded to help choose it.
            return {"fisher_mean": float(values.mean()), "fisher_max": float(values.max())}
        return {}

    def _task_sequences(self, task: ContinualTask):
        """The task's own training records as the Trainer tokenises them (without replayed ones)."""
        base = self.config.base
        examples = load_examples(task.train, base.template, self.tokenizer)
        return tokenize(examples, self.tokenizer, cutoff_len=base.cutoff_len, train_on_inputs=base.train_on_inputs,
                        overlong=base.overlong)

    def _accuracy(self, task: ContinualTask, folder: Path) -> float:
        settings = self.config.settings
        result = evaluate(self.model, self.tokenizer, task.eval, self.scoring[task.name],
                          template=self.config.base.template, batch_size=settings.eval_batch_size,
                          max_new_tokens=settings.eval_max_new_tokens or None, limit=settings.eval_limit or None,
                          progress=self.progress, output_dir=folder, name=task.name)
        return result.accuracy


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
