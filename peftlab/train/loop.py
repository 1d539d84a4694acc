"""The training loop: plain PyTorch, any registered method, resumable.

One optimizer step = ``batch_size / micro_batch_size`` micro-batches; the loss of a step is the mean
over all its supervised tokens (not a mean of micro-batch means). Per step: method hooks
(``on_step``), forward/backward of each micro-batch (+ the methods' regularisation), gradient
clipping, ``before_optimizer_step`` hooks, AdamW, the schedule. Checkpoints hold everything needed
to continue bit-for-bit (adapter, optimizer, scheduler, RNG, data position); SIGINT/SIGTERM save one
at the next step boundary before exiting. A non-finite loss or gradient stops the run with the last
good checkpoint kept.

Under ``torchrun`` (WORLD_SIZE > 1) each rank trains on a disjoint share of every global batch and the
adapter gradients are summed across ranks before clipping: see peftlab/train/distributed.py and
docs/distributed.md. Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import peftlab
from peftlab.core import api
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json
from peftlab.core.method import LayerMethod, TrainingStep
from peftlab.core.tasks import task_ids

from . import checkpoint, distributed
from .data import Sequence, collate, collate_packed, epoch_batches, load_examples, pack, split_validation, tokenize
from .loss import SupervisedLoss, check_activation_budget, check_cuda_graphs


class TrainingError(PeftlabError, RuntimeError):
    """Training cannot continue (non-finite loss, incompatible resume, ...)."""


@dataclass
class TrainArgs:
    """Every setting of a run; the CLI, YAML configs and Python callers all fill this."""

    model: str
    data: str
    output: str
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int = 4
    lr: float = 3e-4
    schedule: str = "linear"  # linear | cosine | constant, after warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cutoff_len: int = 256
    template: str = "alpaca"
    train_on_inputs: bool = False
    overlong: str = "truncate"  # truncate | drop | error
    val_size: int = 0
    eval_every: int = 0  # steps; 0: only at the end when val_size > 0
    group_by_length: bool = True
    packing: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (GPU; fixed shapes help: see packing)
    activation_budget: float | None = None  # compiled blocks: share of activations kept (0: checkpointing)
    offload_activations: bool = False  # what backward reads waits in host memory (GPU; pays with checkpointing)
    cuda_graphs: bool = False  # compiled blocks replay as CUDA graphs; batches are padded to the data's longest row
    shard: bool = False  # under torchrun: split the frozen transformer blocks across ranks (FSDP2)
    calibration_batches: int = 8
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 42
    resume: bool = False
    tensorboard: bool = False

    def validate(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise PeftlabError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                               f"{self.micro_batch_size}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise PeftlabError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise PeftlabError("set epochs > 0 or max_steps > 0")
        if self.shard and self.compile:
            raise PeftlabError("shard and compile together are not supported: choose one")
        if self.activation_budget is not None and not self.compile:
            raise PeftlabError("activation_budget sets what compiled blocks keep for backward: it needs compile")
        check_activation_budget(self.activation_budget)
        check_cuda_graphs(self.cuda_graphs, self.compile, self.offload_activations)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@dataclass
class TrainResult:
    output: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float | None


def schedule_factor(args: TrainArgs, total_steps: int):
    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.schedule == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        if args.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return factor


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """``extra_loss(model)``, when given, adds a term to every micro-batch's loss (EWC penalties and
    other strategies that live outside the adapters). ``attach(model)``, when given, replaces
    attaching ``args.method``: the loop then trains whatever parameters require grad (another
    library's adapters, for comparisons) and saves no adapter files unless peftlab adapters exist."""

    def __init__(self, args: TrainArgs, model=None, tokenizer=None, progress: bool = True,
                 extra_loss: Callable[[torch.nn.Module], torch.Tensor | None] | None = None,
                 attach: Callable[[torch.nn.Module], None] | None = None):
        args.validate()
        distributed.check_batch_split(args.batch_size, args.micro_batch_size, distributed.environment_world_size())
        self.dist = distributed.from_environment()
        self.args = args
        self.progress = progress
        self.extra_loss = extra_loss
        self.custom_attach = attach
        self.output = Path(args.output)
        self.checkpoints = self.output / "checkpoints"
        self.sharded = args.shard and self.dist.enabled
        if model is None:
            from peftlab.models import default_dtype, load_model

            # Sharded runs load into host memory, in the dtype of the rank's device, which then receives
            # only its shards.
            model, tokenizer = (load_model(args.model, device="cpu", dtype=default_dtype(self.dist.device))
                                if self.sharded else load_model(args.model))
        if self.dist.enabled and not self.sharded and next(model.parameters()).device != self.dist.device:
            model.to(self.dist.device)  # each rank on its own GPU, whatever device the caller loaded to
        self.model, self.tokenizer = model, tokenizer
        self._place(next(model.parameters()).device)
        if args.cuda_graphs and self.device.type != "cuda":
            warnings.warn("cuda_graphs: the model is not on a CUDA device; compiled blocks run without graphs",
                          stacklevel=2)
        self._prepare_data()

    def _place(self, device: torch.device) -> None:
        """Where batches go, and the autocast that goes with it."""
        self.device = device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # ---------------------------------------------------------------------------------------- data

    def _prepare_data(self) -> None:
        args = self.args
        examples = load_examples(args.data, args.template, self.tokenizer)
        sequences = tokenize(examples, self.tokenizer, cutoff_len=args.cutoff_len,
                             train_on_inputs=args.train_on_inputs, overlong=args.overlong)
        self.train_set, self.val_set = split_validation(sequences, args.val_size, args.seed)
        self.tasks = sorted({s.task for s in sequences if s.task is not None})
        if self.tasks and any(s.task is None for s in sequences):
            missing = next(s.index for s in sequences if s.task is None)
            raise TrainingError(f"some records have a task and others not (record {missing} has none)")
        if self.tasks and args.packing:
            raise TrainingError("packing mixes records of different tasks in one row; turn packing off")
        self.micro_per_step = args.batch_size // args.micro_batch_size
        self.pad_id = self.tokenizer.pad_token_id
        units = pack(self.train_set, args.cutoff_len) if args.packing else [[s] for s in self.train_set]
        self.units = units
        self.unit_lengths = [sum(len(s) for s in u) for u in units]
        # CUDA graphs are recorded per input shape: one width for every batch keeps them to one recording. The
        # data's longest row, not cutoff_len, so that a generous cutoff does not pad every row to it.
        self.graph_width = (max(self.unit_lengths + [len(s) for s in self.val_set], default=None)
                            if args.cuda_graphs else None)
        self.micro_per_epoch = math.ceil(len(units) / args.micro_batch_size)
        total_micro = math.ceil(args.epochs * self.micro_per_epoch)
        self.total_steps = args.max_steps or max(1, math.ceil(total_micro / self.micro_per_step))

    def _collate(self, units: list[list[Sequence]]) -> dict[str, torch.Tensor]:
        if self.args.packing:
            mask_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            batch = collate_packed(units, self.pad_id, mask_dtype, self.graph_width)
        else:
            batch = collate([u[0] for u in units], self.pad_id, self.tasks, self.graph_width)
        if self.device.type != "cuda":
            return {k: v.to(self.device) for k, v in batch.items()}
        # From pinned memory the copy is queued behind the GPU's work; from pageable memory the host waits for it.
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def _micro_batches(self, epoch: int, cursor: int):
        """Endless stream of (epoch, cursor after it, units to collate, real tokens in them) from a data
        position; every rank walks the whole stream and collates only its own micro-batches."""
        lengths = self.unit_lengths
        while True:
            order = epoch_batches(lengths, self.args.micro_batch_size, seed=self.args.seed, epoch=epoch,
                                  group_by_length=self.args.group_by_length)
            for index in range(cursor, len(order)):
                units = [self.units[i] for i in order[index]]
                yield epoch, index + 1, units, sum(lengths[i] for i in order[index])
            epoch, cursor = epoch + 1, 0

    # ------------------------------------------------------------------------------------ adapters

    def _attach(self) -> Path | None:
        """Attach fresh adapters, or the latest checkpoint's when resuming; returns that checkpoint.

        ``method`` may stack several methods, ``"prompt+lora"``: each is attached under its own name
        with ``method_options[<method>]`` and all train together.
        """
        args = self.args
        resume_from = checkpoint.latest(self.checkpoints) if args.resume else None
        if args.resume and resume_from is None:
            raise TrainingError(f"--resume: no checkpoint under {self.checkpoints}")
        if resume_from is not None:
            peftlab.load(self.model, resume_from)
            return resume_from
        if self.custom_attach is not None:
            self.custom_attach(self.model)
            return None
        methods = self.adapter_names
        for method in methods:
            options = dict(args.method_options.get(method, {}) if len(methods) > 1 else args.method_options)
            if self.tasks and "tasks" in {f.name for f in peftlab.method_class(method).option_fields()}:
                options.setdefault("tasks", tuple(self.tasks))
            torch.manual_seed(args.seed)
            peftlab.adapt(self.model, method, name=method if len(methods) > 1 else "default",
                          calibration=self._calibration(method), **options)
        peftlab.use(self.model, self.saved_names)
        return None

    @property
    def adapter_names(self) -> list[str]:
        return self.args.method.split("+")

    @property
    def saved_names(self) -> str | list[str]:
        """What ``peftlab.save`` gets: one adapter name, or the stack's names in order."""
        return self.adapter_names if len(self.adapter_names) > 1 else "default"

    def _calibration(self, method: str) -> list[dict[str, torch.Tensor]] | None:
        method_class = peftlab.method_class(method)
        if not (issubclass(method_class, LayerMethod) and method_class.needs_calibration):
            return None
        stream = self._micro_batches(0, 0)
        return [{k: v for k, v in self._collate(next(stream)[2]).items() if k not in ("labels", "task_ids")}
                for _ in range(min(self.args.calibration_batches, self.micro_per_epoch))]

    # ---------------------------------------------------------------------------------------- loop

    def run(self) -> TrainResult:
        args = self.args
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        resumed = self._attach()
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:  # after attaching: adapters (and calibration) see the whole base
            distributed.shard_frozen_base(self.model, self.dist)
            self._place(self.dist.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.dist.broadcast_parameters(params)
        if resumed is None:
            self.dist.seed(args.seed)
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(args, self.total_steps))
        step, epoch, cursor, tokens = 0, 0, 0, 0
        if resumed is not None:
            state = checkpoint.read_state(resumed)
            self._check_compatible(state)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self._restore_rng(state)
            step, epoch, cursor, tokens = state["step"], state["epoch"], state["cursor"], state["tokens"]
        if self.dist.is_main:
            write_json(self.output / "train_config.json", dataclasses.asdict(args))
            metrics = _Metrics(self.output / "metrics.jsonl", keep_until=step, tensorboard=args.tensorboard)
        else:
            metrics = _NoMetrics()
        loss_fn = SupervisedLoss(self.model, compile_body=args.compile, activation_budget=args.activation_budget,
                                 offload_activations=args.offload_activations, cuda_graphs=args.cuda_graphs)
        stream = self._micro_batches(epoch, cursor)
        self.model.train()
        last_loss, val_loss, started, verified = float("nan"), None, time.perf_counter(), False
        bar = tqdm(total=self.total_steps, initial=step, disable=not (self.progress and self.dist.is_main),
                   desc="train", unit="step")
        with _StopRequest() as stop, loss_fn:  # leaving, compiled blocks go back to eager, failed runs included
            while step < self.total_steps:
                if self.dist.any(stop.requested):  # signals reach ranks at different steps
                    saved = self._save(step, epoch, cursor, tokens, optimizer, scheduler)
                    bar.close()
                    raise TrainingError(f"interrupted; checkpoint {saved} written: continue with --resume")
                info = TrainingStep(step, self.total_steps, scheduler.get_last_lr()[0], args.lr, self.micro_per_step)
                api.on_step(self.model, info)
                batches, step_tokens = [], 0
                for index in range(self.micro_per_step):
                    epoch, cursor, units, count = next(stream)
                    if self.dist.owns(index):
                        batches.append(self._collate(units))
                    step_tokens += count
                if not verified:
                    verified = True
                    with self._context(batches[0]) as inputs:
                        fused = loss_fn.verify(inputs)
                    fused = loss_fn.fused = self.dist.all(fused)  # one loss path on every rank
                    if not fused:
                        metrics.note("fused loss path unavailable for this model; using the full forward")
                last_loss = self._step(batches, loss_fn, step)
                self.dist.reduce_gradients(params)
                grad_norm = self._clip(params, step)
                api.before_optimizer_step(self.model, info)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += step_tokens
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{info.lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if step % args.log_every == 0 or step == self.total_steps:
                    metrics.log(step=step, epoch=epoch, loss=last_loss, lr=info.lr, grad_norm=grad_norm,
                                tokens=tokens, tokens_per_s=tokens / elapsed, elapsed_s=elapsed)
                if self.val_set and args.eval_every and step % args.eval_every == 0:
                    val_loss = self.validate(loss_fn)
                    metrics.log(step=step, val_loss=val_loss)
                if args.save_every and step % args.save_every == 0:
                    self._save(step, epoch, cursor, tokens, optimizer, scheduler)
            bar.close()
            if self.val_set and (not args.eval_every or self.total_steps % args.eval_every):
                val_loss = self.validate(loss_fn)
                metrics.log(step=step, val_loss=val_loss)
        if peftlab.adapters(self.model) and self.dist.is_main:
            peftlab.save(self.model, self.output, name=self.saved_names)
        metrics.close()
        metrics.plot(self.output / "loss.png")
        self.dist.barrier()  # the outputs exist on every rank's return
        return TrainResult(self.output, step, tokens, time.perf_counter() - started, last_loss, val_loss)

    def _step(self, batches, loss_fn, step: int) -> float:
        """Backward over this rank's micro-batches; returns the step's loss over the global batch.

        Losses are divided by the supervised tokens of the whole global batch (summed over ranks) and
        regularisation terms by the global number of micro-batches, so the gradients summed over ranks
        are the single-process ones. A non-finite loss is reported after the reduction, on every rank
        at once, so no rank is left waiting in a collective.
        """
        local_tokens = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
        [total_tokens] = self.dist.sum([local_tokens])
        losses, finite = [], []
        for batch in batches:
            with self._context(batch) as inputs:
                loss_sum, _ = loss_fn(inputs)
                loss = loss_sum / total_tokens
                for term in (api.regularization(self.model), self.extra_loss and self.extra_loss(self.model)):
                    if term is not None:
                        loss = loss + term / self.micro_per_step
            finite.append(torch.isfinite(loss.detach()))
            with self._tasks(batch):  # checkpointed blocks rerun their forward in backward
                loss.backward()
            losses.append(loss_sum.detach().float() / total_tokens)
        # Read on the host once per step: a read per micro-batch would leave the GPU idle at each one.
        step_loss, non_finite = self.dist.sum([torch.stack(losses).sum().item(), int((~torch.stack(finite)).sum())])
        if non_finite:
            raise TrainingError(self._non_finite("loss", step))
        return step_loss

    @contextmanager
    def _context(self, batch: dict[str, torch.Tensor]):
        """Autocast, and the batch's task ids made visible to task-aware adapters; yields the model inputs."""
        with self.autocast, self._tasks(batch):
            yield {k: v for k, v in batch.items() if k != "task_ids"}

    @staticmethod
    def _tasks(batch: dict[str, torch.Tensor]):
        """The batch's task ids made visible to task-aware adapters (nothing when it has none)."""
        tasks = batch.get("task_ids")
        return task_ids(tasks) if tasks is not None else nullcontext()

    def _clip(self, params, step: int) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm if self.args.max_grad_norm > 0
                                              else float("inf"))
        if not torch.isfinite(norm):
            raise TrainingError(self._non_finite("gradient norm", step))
        return float(norm)

    def _non_finite(self, what: str, step: int) -> str:
        kept = checkpoint.latest(self.checkpoints)
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
        return (f"{what} became non-finite at step {step + 1}; stopped ({where}). "
                f"Try a lower learning rate (now {self.args.lr}) or gradient clipping.")

    def _save(self, step, epoch, cursor, tokens, optimizer, scheduler) -> Path:
        """Rank 0 writes the checkpoint (replicas are equal) with every rank's RNG state in it."""
        rank_rng = self.dist.gather(checkpoint.rng_state())
        target = self.checkpoints / f"step-{step:08d}"
        if self.dist.is_main:
            state = {"step": step, "epoch": epoch, "cursor": cursor, "tokens": tokens,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rank_rng[0], "rank_rng": rank_rng, "args": dataclasses.asdict(self.args)}
            target = checkpoint.write(self.checkpoints, step, self.model, state, self.args.keep_checkpoints,
                                      self.saved_names)
        self.dist.barrier()  # no rank goes on (or resumes) before the checkpoint is complete
        return target

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Each rank takes back its own streams; under another world size, fresh per-rank ones."""
        rank_rng = state.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.dist.world_size:
            checkpoint.restore_rng(rank_rng[self.dist.rank])
        else:
            checkpoint.restore_rng(state["rng"])
            self.dist.seed(self.args.seed + state["step"])

    def _check_compatible(self, state: dict[str, Any]) -> None:
        saved = state["args"]
        for key in ("method", "method_options", "data", "batch_size", "micro_batch_size", "seed", "cutoff_len",
                    "packing", "template"):
            if saved.get(key) != getattr(self.args, key):
                raise TrainingError(f"cannot resume: {key} was {saved.get(key)!r}, now {getattr(self.args, key)!r}")

    @torch.no_grad()
    def validate(self, loss_fn: SupervisedLoss) -> float:
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        starts = range(0, len(self.val_set), self.args.micro_batch_size)
        for start in (s for index, s in enumerate(starts) if self.dist.owns(index)):
            batch = self._collate([[s] for s in self.val_set[start:start + self.args.micro_batch_size]])
            with self._context(batch) as inputs:
                loss_sum, n = loss_fn(inputs)
            total, count = total + loss_sum.item(), count + n
        total, count = self.dist.sum([total, count])
        self.model.train(was_training)
        return total / max(count, 1)


class _Metrics:
    """metrics.jsonl (truncated to ``keep_until`` on resume), optional TensorBoard, the loss plot."""

    def __init__(self, path: Path, keep_until: int, tensorboard: bool):
        self.path = path
        kept = []
        if keep_until and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def log(self, **values: Any) -> None:
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, values["step"])

    def note(self, message: str) -> None:
        self.file.write(json.dumps({"note": message}) + "\n")

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self, target: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(target, dpi=120)
        plt.close(fig)
        return True


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def log(self, **values: Any) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass

    def plot(self, target: Path) -> bool:
        return False


def train(args: TrainArgs, model=None, tokenizer=None, progress: bool = True, extra_loss=None,
          attach=None) -> TrainResult:
    return Trainer(args, model, tokenizer, progress, extra_loss, attach).run()
