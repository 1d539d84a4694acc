"""divcontrol: DivControl's knowledge diversion, a gated mixture of a weight's singular components.

Xie, Feng, Shi, Wang, Rui, Geng 2025, "DivControl: Knowledge Diversion for Controllable Image
Generation", arXiv 2507.23620 (building on KIND, arXiv 2408.07337). No official code was found; this
follows the abstract's mechanism, applied as a fine-tuning method to any linear layer, and marks
every detail it fills in with [peftlab].

The weight is factorised by SVD into rank-one components (pairs of singular vectors). The top ones are
condition-agnostic *learngenes*, shared by every task; the next ones are grouped into K *tailors*, and a
dynamic gate routes each example softly over the tailors from its condition (task) embedding::

    W0 = Σ_i σ_i u_i v_iᵀ          learngenes: i < r_l          tailor k: the next r_t components each
    g(t) = softmax(G · c_t / τ)    (K)    c_t: the task's condition embedding, G: K x e per layer
    y_b = W_res x_b + B_G A_G x_b + Σ_k K·g_k(t_b) · B_k A_k x_b + b

A and B start as the components with √σ on each side (A_G = √σ vᵀ, B_G = u √σ) and train; W_res is
W0 minus those components at init, kept as W0 minus a frozen low-rank term (non-persistent buffers,
recomputed from W0 on load), so W0 itself is never modified. G starts at zero, so g is uniform, K·g_k
= 1, and the output equals the base exactly at init; training moves each task's gate towards the
tailors that serve it while learngenes carry what all tasks share.

[peftlab] choices: (1) condition embeddings: the paper encodes each condition's instruction text with a
frozen text encoder; tasks here are ids, so c_t are fixed orthonormal codes (scaled to norm √e) drawn
from ``seed`` — frozen, like the encoder's output; (2) one gate per adapted layer; (3) the factor K on
the gate, which makes the uniform gate reproduce W0 (the abstract does not give the gate's
normalisation); (4) learngenes are the top r_l singular components and tailors the following K·r_t;
(5) the representation-alignment loss (condition embeddings vs. early diffusion features) has no
analogue in a language model and is omitted; (6) defaults learngene_r 8, tailors 4, tailor_r 4,
embed_dim 32, temperature 1, all seven projections as targets.

Trainable parameters per adapted layer: (r_l + K·r_t)·(in + out) + K·e.

Task ids: without ``peftlab.task_ids`` and ``default_task`` the gate stays neutral (K·g_k = 1 for all
k: every tailor at its learned value, no routing). Merge folds in one selected task (``with
peftlab.task_ids(k): peftlab.merge(model)`` or ``default_task``), else MergeError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.methods.mtlora import MultiTaskMethod, TaskSelector, routed_update


def condition_codes(tasks: int, size: int, seed: int) -> torch.Tensor:
    """(tasks, size) fixed codes of norm √size, orthogonal while tasks ≤ size."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(size, max(tasks, 1), generator=gen)
    if tasks <= size:
        raw = torch.linalg.qr(raw).Q
    else:
        raw = raw / raw.norm(dim=0, keepdim=True)
    return raw.T[:tasks].contiguous() * math.sqrt(size)


def principal_components(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: rank x in, B: out x rank) with B A = the top-rank SVD truncation, √σ on each side."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


class DivControlAdapter(LayerAdapter):
    def __init__(self, config: DivControl, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        dev = site.device
        r_l, tailors, r_t = config.learngene_r, config.tailors, config.tailor_r
        self.selector = TaskSelector(config)
        self.tailors, self.tailor_r, self.temperature = tailors, r_t, config.temperature
        a0, b0 = principal_components(site.weight(), r_l + tailors * r_t)
        self.register_buffer("initial_A", a0.to(dev), persistent=False)
        self.register_buffer("initial_B", b0.to(dev), persistent=False)
        codes = condition_codes(config.num_tasks, config.embed_dim, config.seed)
        self.register_buffer("condition_codes", codes.to(dev), persistent=False)
        self.learngene_A = nn.Parameter(a0[:r_l].clone().to(dev))
        self.learngene_B = nn.Parameter(b0[:, :r_l].clone().to(dev))
        self.tailor_A = nn.Parameter(a0[r_l:].clone().to(dev))
        self.tailor_B = nn.Parameter(b0[:, r_l:].clone().to(dev))
        self.gate = nn.Parameter(torch.zeros(tailors, config.embed_dim, device=dev))

    def gate_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, K): K·softmax(G c_t / τ) per example; 1 everywhere at the neutral (zero) gate."""
        logits = self.condition_codes[ids] @ self.gate.T / self.temperature
        return self.tailors * torch.softmax(logits, dim=-1)

    def tailor_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.selector.for_batch(x)
        if ids is None:  # no routing: every tailor at weight 1
            return torch.ones(1, self.tailors * self.tailor_r, device=x.device)
        return self.gate_weights(ids).repeat_interleave(self.tailor_r, dim=1)

    def forward(self, layer, x, base):
        out = base(x)
        out = out + linear(linear(x, self.learngene_A), self.learngene_B)
        coefficients = self.tailor_coefficients(x)
        if coefficients.shape[0] == 1:
            tailored = linear(linear(x, self.tailor_A) * coefficients.to(x.dtype), self.tailor_B)
        else:
            tailored = routed_update(x, self.tailor_A, self.tailor_B, coefficients)
        return out + tailored - linear(linear(x, self.initial_A), self.initial_B)

    def delta_weight(self, layer) -> torch.Tensor:
        task = self.selector.required_merge_task()
        ids = torch.tensor([task], device=self.gate.device)
        weights = self.gate_weights(ids).repeat_interleave(self.tailor_r, dim=1)[0].float()
        learngene = self.learngene_B.float() @ self.learngene_A.float()
        tailored = (self.tailor_B.float() * weights[None, :]) @ self.tailor_A.float()
        return learngene + tailored - self.initial_B.float() @ self.initial_A.float()


@register
@dataclass
class DivControl(MultiTaskMethod):
    name: ClassVar[str] = "divcontrol"
    family: ClassVar[str] = "multi-task"
    paper: ClassVar[str] = "DivControl (knowledge diversion), arXiv 2507.23620"
    formula: ClassVar[str] = "(r_l + K·r_t)·(in + out) + K·e"
    mergeable: ClassVar[bool] = True  # for one selected task
    identity_at_init: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True  # the components come from W0's SVD

    learngene_r: int = config_field(8, "r_l: top singular components shared by all tasks (learngenes)")
    tailors: int = config_field(4, "K: number of tailors the gate routes over")
    tailor_r: int = config_field(4, "r_t: singular components per tailor (the next K·r_t after the learngenes)")
    embed_dim: int = config_field(32, "e: size of the fixed condition (task) codes the gate reads")
    temperature: float = config_field(1.0, "τ: softmax temperature of the gate")
    seed: int = config_field(0, "seed of the condition codes")

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "learngene_r", "tailors", "tailor_r", "embed_dim")
        check(self.temperature > 0, self.name, f"temperature must be positive, got {self.temperature}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")

    @property
    def components(self) -> int:
        return self.learngene_r + self.tailors * self.tailor_r

    def build(self, site: Site) -> LayerAdapter:
        if self.components > min(site.features):
            raise ConfigError(f"{self.name}: learngene_r + tailors·tailor_r = {self.components} exceeds "
                              f"min(in, out) = {min(site.features)} at {site.path}")
        return DivControlAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.components * (in_features + out_features) + self.tailors * self.embed_dim
