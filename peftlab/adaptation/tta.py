"""Test-time adaptation over an unlabelled stream: LAME (output correction), PSMT and Tent (online updates).

Each adapter wraps a classifier that maps a batch to logits (a tensor, or an output with ``.logits``;
a dict batch is passed as keyword arguments) and consumes a stream of unlabelled batches::

    lame = LAME(model, features=model.body)          # features: a submodule (hooked) or batch -> tensor
    for probs in lame.run(stream): ...               # corrected class probabilities per batch

    psmt = PSMT(model, source=source_batches)        # updates the parameters that require grad
    for logits in psmt.run(stream): ...              # teacher + student logits per batch

LAME (Boudiaf et al., CVPR 2022; official code github.com/fiveai/LAME, ``src/adaptation/lame.py``)
leaves the model untouched and corrects a batch's probabilities p with a Laplacian term over the
batch's L2-normalised features. It minimises, over assignments z on the simplex,

    Σ_i KL(z_i ‖ p_i) − λ Σ_ij w_ij z_iᵀ z_j

by the concave-convex procedure z_i ← softmax(log p_i + λ Σ_j w_ij z_j), stopped when the energy
changes by at most 1e-8 relative (at most 100 steps), λ = 1. Affinities as in the official code:
``rbf`` (its default) w_ij = exp(−‖f_i − f_j‖² / 2σ²), self included, with σ the mean over i of the
distance to the k-th nearest point of the batch counting i itself (the code's σ option is unused);
``kNN`` w_ij = 1 for the k nearest neighbours j ≠ i; ``linear`` w_ij = f_iᵀ f_j. k = 5.

PSMT (Tian & Lyu, ACCV 2024, arXiv 2407.02253; official code github.com/JiaxuTian/PSMT,
``classification/methods/psmt.py``) is a mean teacher. Per batch, following the official code:

1. student loss: symmetric cross-entropy between student and teacher logits (α = 0.5) plus the
   selective-distillation term λ Σ_i F_i (θ_i − θ_i^src)², λ = 500, where F is the diagonal Fisher
   of the source model (squared gradients of the cross-entropy against its own argmax, averaged over
   source batches) — parameters that mattered on the source are held near their source values;
2. one Adam step (lr 1e-3);
3. selective teacher update: the squared gradients of this step are a per-element Fisher estimate;
   elements below its 3% quantile are restored to their source values in the student and copied to
   the teacher, the rest follow the EMA θ' ← α θ' + (1 − α) θ. The official code runs the EMA twice
   per batch with α = 0.999, which equals one update with α = 0.999² ≈ 0.998, our default;
4. the prediction is teacher + student logits (before the update).

The official code also makes every BatchNorm layer normalise with the test batch's statistics;
``use_batch_statistics(model)`` does the same and is left to the caller (Tent's code does it too).

Where they differ the paper and code disagree: the paper's teacher rule θ' ← m θ' + (1 − m)(EMA)
keeps masked teacher elements unchanged instead of restoring them (``teacher_mask="freeze"``), and
its student term anchors at the previous step's parameters, which is zero at the point where the
gradient is taken; we follow the code. [peftlab] Without source batches the Fisher is measured on
the first stream batch before any update (the source model on target inputs, pseudo-labelled by its
own argmax). The code's augmentation branch is dead (the augmented view is overwritten by the clean
one); ``augment`` re-enables a second student view. Only parameters with ``requires_grad`` adapt,
so PSMT can run on a peftlab adapter's parameters as well as on a whole model.

Tent (Wang et al., ICLR 2021) minimises the mean prediction entropy of each batch with one
optimizer step, predicting with the logits computed before the step; it is the usual baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError

AFFINITIES = ("rbf", "kNN", "linear")


def call_model(model: Callable, batch: Any) -> torch.Tensor:
    """Logits of ``model`` on ``batch``: a dict is passed as keyword arguments, anything else as one argument."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


# --------------------------------------------------------------------------------------------------
# LAME


def affinity_matrix(features: torch.Tensor, kind: str = "rbf", knn: int = 5) -> torch.Tensor:
    """The (N, N) affinity of LAME over the rows of ``features`` (normalise them first)."""
    if kind == "linear":
        return features @ features.T
    dist = torch.cdist(features, features)
    n = features.shape[0]
    if kind == "kNN":
        neighbours = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[:, 1:]  # drop the point itself
        return torch.zeros_like(dist).scatter_(-1, neighbours, 1.0)
    if kind == "rbf":
        kth = dist.topk(min(knn, n), dim=-1, largest=False).values[:, -1]
        sigma = kth.mean().clamp_min(torch.finfo(dist.dtype).tiny)
        return torch.exp(-dist.pow(2) / (2 * sigma**2))
    raise ConfigError(f"lame: affinity must be one of {AFFINITIES}, got {kind!r}")


def laplacian_assignment(probs: torch.Tensor, kernel: torch.Tensor, weight: float = 1.0,
                         max_steps: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """Concave-convex iterations z ← softmax(log p + λ W z) until the LAME energy settles."""
    unary = -torch.log(probs + 1e-10)
    z = (-unary).softmax(-1)
    previous = float("inf")
    for step in range(max_steps):
        pairwise = weight * kernel @ z
        z = (pairwise - unary).softmax(-1)
        energy = (unary * z - pairwise * z + z * torch.log(z.clamp_min(1e-20))).sum().item()
        if step > 1 and abs(energy - previous) <= tol * abs(previous):
            break
        previous = energy
    return z


def lame_correct(probs: torch.Tensor, features: torch.Tensor, affinity: str = "rbf", knn: int = 5,
                 force_symmetry: bool = False, weight: float = 1.0, max_steps: int = 100) -> torch.Tensor:
    """LAME's corrected probabilities for one batch: ``probs`` (N, K), ``features`` (N, d)."""
    features = F.normalize(features.float().flatten(1), dim=-1)
    kernel = affinity_matrix(features, affinity, knn)
    if force_symmetry:
        kernel = (kernel + kernel.T) / 2
    return laplacian_assignment(probs.float(), kernel, weight, max_steps)


class _Capture:
    """Keeps the output of a submodule during the wrapped model's forward."""

    def __init__(self, module: nn.Module):
        self.value = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output[0] if isinstance(output, tuple) else output


class LAME:
    """Laplacian-adjusted maximum likelihood on the model's outputs; the model is never updated.

    ``features`` is a submodule of ``model`` whose output are the features (captured in the same
    forward) or a callable batch -> (N, d) features.
    """

    def __init__(self, model: Callable, *, features: nn.Module | Callable[[Any], torch.Tensor],
                 affinity: str = "rbf", knn: int = 5, force_symmetry: bool = False, weight: float = 1.0,
                 max_steps: int = 100):
        if affinity not in AFFINITIES:
            raise ConfigError(f"lame: affinity must be one of {AFFINITIES}, got {affinity!r}")
        if knn < 1:
            raise ConfigError(f"lame: knn must be positive, got {knn}")
        self.model = model
        self.capture = _Capture(features) if isinstance(features, nn.Module) else None
        self.features = features
        self.options = dict(affinity=affinity, knn=knn, force_symmetry=force_symmetry, weight=weight,
                            max_steps=max_steps)

    @torch.no_grad()
    def __call__(self, batch: Any) -> torch.Tensor:
        """Corrected class probabilities (N, K) of one batch."""
        logits = call_model(self.model, batch)
        features = self.capture.value if self.capture else self.features(batch)
        return lame_correct(logits.float().softmax(-1), features, **self.options)

    def run(self, stream: Iterable[Any]) -> Iterator[torch.Tensor]:
        for batch in stream:
            yield self(batch)

    def close(self) -> None:
        """Remove the feature hook from the model."""
        if self.capture:
            self.capture.handle.remove()


# --------------------------------------------------------------------------------------------------
# PSMT


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with the current batch's statistics, in training and eval mode
    alike, dropping its running estimates: the setting in which the official Tent and PSMT code adapt."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return model


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-example (1 − α)·CE(teacher → student) + α·CE(student → teacher), as in PSMT's code."""
    forward = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1)
    backward = -(student.softmax(-1) * teacher.log_softmax(-1)).sum(-1)
    return (1 - alpha) * forward + alpha * backward


def fisher_information(model: nn.Module, batches: Iterable[Any],
                       params: dict[str, nn.Parameter] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: squared gradients of the cross-entropy against the model's own argmax, averaged
    over batches (no labels needed)."""
    params = params if params is not None else trainable(model)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = call_model(model, batch)
        F.cross_entropy(logits.float(), logits.argmax(-1)).backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name] += p.grad.float().pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ConfigError("psmt: the source batches for the Fisher information are empty")
    return {name: f / count for name, f in total.items()}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of a flat tensor (torch.quantile refuses more than 2^24 values)."""
    position = q * (values.numel() - 1)
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    low_value = values.kthvalue(low + 1).values
    high_value = values.kthvalue(high + 1).values
    return low_value + (high_value - low_value) * (position - low)


def _squared_grad(param: nn.Parameter) -> torch.Tensor:
    """This step's per-element Fisher estimate (zero where the loss did not reach the parameter)."""
    if param.grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return param.grad.detach().float().pow(2)


class PSMT:
    """Parameter-Selective Mean Teacher over an unlabelled stream; see the module docstring.

    ``model`` is the student and adapts in place; ``teacher`` is a frozen copy updated by the selective
    EMA. ``fisher_weight=0`` with ``restore_quantile=0`` is a plain mean teacher.
    """

    def __init__(self, model: nn.Module, *, source: Iterable[Any] | None = None, lr: float = 1e-3,
                 momentum: float = 0.998, fisher_weight: float = 500.0, restore_quantile: float = 0.03,
                 alpha: float = 0.5, teacher_mask: str = "restore",
                 augment: Callable[[Any], Any] | None = None, optimizer: torch.optim.Optimizer | None = None):
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= restore_quantile < 1.0:
            raise ConfigError("psmt: momentum must lie in [0, 1] and restore_quantile in [0, 1)")
        if teacher_mask not in ("restore", "freeze"):
            raise ConfigError(f"psmt: teacher_mask must be 'restore' or 'freeze', got {teacher_mask!r}")
        self.student = model
        self.params = trainable(model)
        if not self.params:
            raise ConfigError("psmt: the model has no parameter that requires grad")
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.teacher_params = dict(self.teacher.named_parameters())
        self.source_values = {name: p.detach().clone() for name, p in self.params.items()}
        self.optimizer = optimizer or torch.optim.Adam(self.params.values(), lr=lr, betas=(0.9, 0.999))
        self.momentum, self.fisher_weight, self.restore_quantile = momentum, fisher_weight, restore_quantile
        self.alpha, self.teacher_mask, self.augment = alpha, teacher_mask, augment
        self.fisher = fisher_information(model, source, self.params) if source is not None and fisher_weight else None

    def distillation_penalty(self) -> torch.Tensor:
        """λ Σ F (θ − θ_src)²: selective distillation towards the source parameters."""
        terms = [(self.fisher[n] * (p.float() - self.source_values[n].float()).pow(2)).sum()
                 for n, p in self.params.items()]
        return self.fisher_weight * torch.stack(terms).sum()

    def student_loss(self, batch: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        loss = symmetric_cross_entropy(student_logits.float(), teacher_logits.float(), self.alpha).mean()
        if self.augment is not None:
            augmented = call_model(self.student, self.augment(batch)).float()
            loss = (loss + symmetric_cross_entropy(augmented, teacher_logits.float(), self.alpha).mean()) / 2
        if self.fisher is not None:
            loss = loss + self.distillation_penalty()
        return loss

    def step(self, batch: Any) -> torch.Tensor:
        """Adapt on one batch; returns its prediction, teacher + student logits from before the update."""
        if self.fisher is None and self.fisher_weight:
            self.fisher = fisher_information(self.student, [batch], self.params)
        with torch.enable_grad():
            student_logits = call_model(self.student, batch)
            with torch.no_grad():
                teacher_logits = call_model(self.teacher, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.student_loss(batch, student_logits, teacher_logits).backward()
        step_fisher = {n: _squared_grad(p) for n, p in self.params.items()}
        self.optimizer.step()
        self.update_teacher(step_fisher)
        return (teacher_logits + student_logits).detach()

    @torch.no_grad()
    def update_teacher(self, step_fisher: dict[str, torch.Tensor]) -> None:
        threshold = None
        if self.restore_quantile > 0:
            threshold = quantile(torch.cat([f.flatten() for f in step_fisher.values()]), self.restore_quantile)
        for name, p in self.params.items():
            teacher = self.teacher_params[name]
            ema = teacher * self.momentum + p.detach() * (1 - self.momentum)
            if threshold is None:
                teacher.copy_(ema)
                continue
            mask = step_fisher[name] < threshold
            if self.teacher_mask == "restore":
                p.copy_(torch.where(mask, self.source_values[name], p))
                teacher.copy_(torch.where(mask, p, ema))
            else:
                teacher.copy_(torch.where(mask, teacher, ema))

    @torch.no_grad()
    def predict(self, batch: Any) -> torch.Tensor:
        """Teacher + student logits without adapting."""
        return call_model(self.teacher, batch) + call_model(self.student, batch)

    def run(self, stream: Iterable[Any]) -> Iterator[torch.Tensor]:
        for batch in stream:
            yield self.step(batch)


# --------------------------------------------------------------------------------------------------
# Tent


class Tent:
    """Entropy minimisation, one optimizer step per batch, on the parameters that require grad."""

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, optimizer: torch.optim.Optimizer | None = None):
        params = list(trainable(model).values())
        if not params:
            raise ConfigError("tent: the model has no parameter that requires grad")
        self.model = model
        self.optimizer = optimizer or torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

    def step(self, batch: Any) -> torch.Tensor:
        with torch.enable_grad():
            logits = call_model(self.model, batch)
            probs = logits.float().softmax(-1)
            entropy = -(probs * logits.float().log_softmax(-1)).sum(-1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            entropy.backward()
        self.optimizer.step()
        return logits.detach()

    @torch.no_grad()
    def predict(self, batch: Any) -> torch.Tensor:
        return call_model(self.model, batch)

    def run(self, stream: Iterable[Any]) -> Iterator[torch.Tensor]:
        for batch in stream:
            yield self.step(batch)
