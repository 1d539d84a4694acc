"""Adaptation on a frozen model's outputs: CrossTune, CQD^A-style score calibration and CoRA-style injection.

None of these touches the base model's weights; each trains a small module on top of what the model
returns from forward passes.

CrossTune (Luo, Zhang, Zhang & Li, LREC-COLING 2024, arXiv 2403.12468) classifies with a
label-enhanced cross-attention network on features of a black-box model (an inference API: forward
outputs only). No official code was found; the network follows the paper's description (label
descriptions encoded by the same black-box model, multi-head cross-attention relating them to the
input sequence) and the details are our own [peftlab]. Each class c has a label description whose
frozen features, mean pooled, give e_c. Every label queries the input's token features H::

    a_bc = W_o MultiHeadAttention(q = W_q e_c, k = W_k H_b, v = W_v H_b)
    logit_bc = s · cos(a_bc, e_c) + b_c                 s = 10 at init, learned

with W_q, W_k, W_v, W_o starting at the identity: untrained, a class scores by how well the input
tokens that resemble its description match it, so the few shots refine a sensible zero-shot rule
and classes keep a meaning through their descriptions (test inputs may use words no shot contained).
Variants with the input as query or a free linear output layer overfitted in our few-shot checks.
The paper's ChatGPT data augmentation and the switch that filters it are data-side steps outside
this module. ``frozen_features`` computes features without autograd, so no gradient reaches the model.

CQD^A (Arakelyan, Minervini, Daza, Cochez & Augenstein, NeurIPS 2023, arXiv 2301.12313; official code
github.com/EdinburghNLP/adaptive-cqd, ``cqda/cqd/base.py``) recalibrates a frozen link predictor's
scores before they are combined by t-norms: φ' = φ·(1 + α) + β. In the official ``affine`` transform
(α, β) is a sum of linear maps of the subject, predicate and object embeddings, initialised at 10⁻³
times PyTorch's default so the transform starts near identity, and trained through the complex-query
answering loss. ``ScoreCalibration`` keeps that form: a per-relation table of (α, β) (a linear map
of a one-hot predicate; zeros, so it starts exactly at identity) plus optional linear maps of
query-side features (B, d) and candidate-side features (N, d) with the official 10⁻³ initialisation.

CoRA (covariate-aware adaptation of time-series foundation models, THUML; arXiv 2510.12681) keeps the
backbone frozen as a feature extractor and injects embeddings of exogenous covariates through a
zero-initialised projection, so the adapted model starts as the base model exactly and takes in the
covariates gradually. Its Granger Causality Embedding weighs each covariate by its learned
predictive contribution; here [peftlab] each covariate embedding is aligned to the target embedding
by its own linear map and weighted by a softmax over learned per-covariate scores (``granger=True``,
equal weights at start; ``covariate_weights()`` reads them)::

    h = backbone(x)                         (frozen, no autograd)
    c = Σ_i softmax(g)_i · A_i cov_i
    y = head(h + Z c)                       Z = 0 at init

The official code was not available here; the description follows the paper's abstract and method
summary. Covariates are passed already embedded (the paper embeds series covariates with the same
frozen backbone, text and images with frozen encoders of their modality).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError


@torch.no_grad()
def frozen_features(encode: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Black-box access: the model's features from a forward pass, detached (``.last_hidden_state`` if present)."""
    out = encode(*args, **kwargs)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return out.detach()


def mean_pool(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the token axis of (N, L, d) features, counting only tokens where ``mask`` is set."""
    if features.dim() == 2:
        return features
    if mask is None:
        return features.mean(1)
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def nearest_label(features: torch.Tensor, label_features: torch.Tensor, mask: torch.Tensor | None = None,
                  label_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-shot scores: cosine similarity between pooled input and pooled label-description features."""
    inputs = F.normalize(mean_pool(features, mask).float(), dim=-1)
    labels = F.normalize(mean_pool(label_features, label_mask).float(), dim=-1)
    return inputs @ labels.T


class CrossTune(nn.Module):
    """Label-enhanced cross-attention classifier on frozen features; see the module docstring.

    ``label_features`` are the frozen model's features of the C label descriptions, (C, L, d) with
    ``label_mask`` (C, L) or already pooled (C, d).
    """

    def __init__(self, label_features: torch.Tensor, label_mask: torch.Tensor | None = None, *, heads: int = 4,
                 scale: float = 10.0):
        super().__init__()
        dim = label_features.shape[-1]
        if dim % heads:
            raise ConfigError(f"crosstune: feature size {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.register_buffer("labels", mean_pool(label_features.detach().float(), label_mask))
        self.query, self.key, self.value, self.output = (_identity_linear(dim) for _ in range(4))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.zeros(self.labels.shape[0]))

    def attend(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each label's multi-head attention summary of each input: (B, C, d)."""
        batch, length, dim = features.shape
        split = (self.heads, dim // self.heads)
        queries = self.query(self.labels).view(-1, *split).transpose(0, 1)  # (h, C, d_h)
        keys = self.key(features).view(batch, length, *split).transpose(1, 2)  # (B, h, L, d_h)
        values = self.value(features).view(batch, length, *split).transpose(1, 2)
        scores = torch.einsum("hcd,bhld->bhcl", queries, keys) / math.sqrt(split[1])
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        attended = torch.einsum("bhcl,bhld->bchd", scores.softmax(-1), values)
        return self.output(attended.reshape(batch, -1, dim))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, C) from input features (B, L, d) (``mask``: 1 on real tokens) or (B, d)."""
        features = features.float()
        if features.dim() == 2:
            features = features.unsqueeze(1)
        similarity = F.cosine_similarity(self.attend(features, mask), self.labels.unsqueeze(0), dim=-1)
        return self.log_scale.exp() * similarity + self.bias

    def fit(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
            steps: int = 200, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int | None = None,
            seed: int = 0) -> list[float]:
        """Train on (few-shot) features with cross-entropy; returns the loss per step."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            rows = _minibatch(len(labels), batch_size, generator)
            loss = F.cross_entropy(self(features[rows], None if mask is None else mask[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _minibatch(count: int, batch_size: int | None, generator: torch.Generator) -> torch.Tensor:
    if batch_size is None or batch_size >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:batch_size]


# --------------------------------------------------------------------------------------------------
# CQD^A score calibration


class ScoreCalibration(nn.Module):
    """φ' = φ·(1 + α) + β with (α, β) from the relation and, optionally, query and candidate features."""

    def __init__(self, relations: int | None = None, *, query_dim: int | None = None,
                 candidate_dim: int | None = None, init_scale: float = 1e-3):
        super().__init__()
        if relations is None and query_dim is None and candidate_dim is None:
            raise ConfigError("score calibration needs relations, query_dim or candidate_dim")
        self.per_relation = nn.Parameter(torch.zeros(relations, 2)) if relations else None
        self.query = _small_linear(query_dim, init_scale) if query_dim else None
        self.candidate = _small_linear(candidate_dim, init_scale) if candidate_dim else None

    def coefficients(self, relation: torch.Tensor | None, query: torch.Tensor | None,
                     candidates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """α, β broadcastable to (B, N) scores."""
        total = torch.zeros(1, 1, 2, device=self._device())
        if self.per_relation is not None:
            total = total + self.per_relation[_required(relation, "relation")][:, None, :]
        if self.query is not None:
            total = total + self.query(_required(query, "query")).float()[:, None, :]
        if self.candidate is not None:
            total = total + self.candidate(_required(candidates, "candidates")).float()[None, :, :]
        return total[..., 0], total[..., 1]

    def forward(self, scores: torch.Tensor, relation: torch.Tensor | None = None, query: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated (B, N) scores of B queries (``relation``: (B,) ids) over N candidates."""
        alpha, beta = self.coefficients(relation, query, candidates)
        return scores * (1 + alpha) + beta

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def _small_linear(dim: int, scale: float) -> nn.Linear:
    layer = nn.Linear(dim, 2)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
    return layer


def _required(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ConfigError(f"score calibration was built with {name} inputs; pass {name}=...")
    return value


class CalibratedScorer(nn.Module):
    """A frozen scorer followed by a trainable ``ScoreCalibration``; the scorer runs without autograd."""

    def __init__(self, scorer: Callable[..., torch.Tensor], calibration: ScoreCalibration):
        super().__init__()
        if isinstance(scorer, nn.Module):
            scorer.requires_grad_(False)
        self.scorer = scorer
        self.calibration = calibration

    def forward(self, *args: Any, relation: torch.Tensor | None = None, query: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            scores = self.scorer(*args, **kwargs)
        return self.calibration(scores, relation, query, candidates)


# --------------------------------------------------------------------------------------------------
# CoRA


class CoRA(nn.Module):
    """Covariate injection into a frozen backbone's embedding through a zero-initialised projection.

    ``backbone`` maps the input to an embedding (B, embed_dim); ``head`` maps the embedding to the output.
    Both are frozen (``train_head=True`` lets the head train). ``covariate_dims`` are the sizes of the
    covariate embeddings passed to ``forward``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, embed_dim: int, covariate_dims: Sequence[int], *,
                 granger: bool = True, train_head: bool = False):
        super().__init__()
        if not covariate_dims:
            raise ConfigError("cora: give at least one covariate size")
        self.backbone = backbone.requires_grad_(False)
        self.head = head.requires_grad_(train_head)
        self.align = nn.ModuleList(nn.Linear(dim, embed_dim) for dim in covariate_dims)
        self.granger = nn.Parameter(torch.zeros(len(covariate_dims))) if granger else None
        self.inject = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.inject.weight)
        nn.init.zeros_(self.inject.bias)

    def covariate_weights(self) -> torch.Tensor:
        count = len(self.align)
        return self.granger.softmax(0) if self.granger is not None else torch.full((count,), 1.0 / count)

    def condition(self, covariates: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(covariates) != len(self.align):
            raise ConfigError(f"cora: expected {len(self.align)} covariates, got {len(covariates)}")
        weights = self.covariate_weights()
        return sum(w * align(c.float()) for w, align, c in zip(weights, self.align, covariates))

    def forward(self, inputs: Any, covariates: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            embedding = self.backbone(inputs)
        injected = self.inject(self.condition(covariates)).to(embedding.dtype)
        return self.head(embedding + injected)

    def base(self, inputs: Any) -> torch.Tensor:
        """The unadapted model: head(backbone(inputs))."""
        with torch.no_grad():
            return self.head(self.backbone(inputs))
