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

Computation: learngenes, tailors and the frozen term are one stacked rank-2(r_l + K·r_t) pair, added
onto the base output by a single addmm (``mtlora.routed_update``), so no output-sized sum is made in
forward or backward. When the batch has one task (the usual case) its gate weights ride on the tailor
columns of B (out x K·r_t) and the token-sized activations only meet the two GEMMs; a mixed batch
weights the rank-sized activations x Aᵀ per example instead. The frozen term's sign is folded into a
cached −B0 and the codes are pre-divided by τ (both constants). Under torch.compile every batch takes
the per-example path, with the ids from ``TaskSelector.traced_ids`` and the constants derived in the
graph, so one graph serves every layer and task (see ``mtlora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
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
    """(A: rank x in, B: out x rank) with B A = the top-rank SVD truncation, √σ on each side; row-major
    (the SVD's factors may come column-major, and a parameter in that layout gets its gradient copied
    into it at every step)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root[None, :]).contiguous()


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
        self._constants: dict[str, tuple] = {}  # constant()'s cache

    def gate_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, K): K·softmax(G c_t / τ) per example; 1 everywhere at the neutral (zero) gate."""
        logits = self.constant("scaled_codes")[ids] @ self.gate.T
        return self.tailors * torch.softmax(logits, dim=-1)

    def tailor_coefficients(self, task: int) -> torch.Tensor:
        """(K·r_t,): task's gate weight K·g_k(t) on each of tailor k's r_t components."""
        probabilities = torch.softmax(torch.mv(self.gate, self.constant("scaled_codes")[task]), dim=0)
        expansion = self.constant("expansion").to(probabilities.dtype)  # it carries the factor K
        return torch.mv(expansion, probabilities)

    def constant(self, name: str) -> torch.Tensor:
        """Tensors derived from the frozen buffers, rebuilt when a buffer is replaced or edited:
        scaled_codes (T, e) = codes / τ; expansion (K·r_t, K) = K on each tailor's rows, to spread K·g
        over the tailor's components with one product; negated_B = −B0. Compiled code derives them in
        its graph (the cache's version check would branch on a tensor's state there)."""
        source = self.initial_B if name == "negated_B" else self.condition_codes
        if torch.compiler.is_compiling():
            return self._derive(name, source)
        key = (source._version, self.temperature, self.tailors, self.tailor_r)
        cached = self._constants.get(name)
        if cached is not None and cached[0] is source and cached[1] == key:
            return cached[2]
        value = self._derive(name, source)
        self._constants[name] = (source, key, value)
        return value

    def _derive(self, name: str, source: torch.Tensor) -> torch.Tensor:
        if name == "negated_B":
            return -source
        if name == "scaled_codes":
            return source / self.temperature
        eye = torch.eye(self.tailors, dtype=source.dtype, device=source.device)
        return (self.tailors * eye).repeat_interleave(self.tailor_r, dim=0)

    def forward(self, layer, x, base):
        a = torch.cat([self.learngene_A, self.tailor_A, self.initial_A])
        tailor_B, gates = self.tailor_B, None
        if torch.compiler.is_compiling():
            gates = self.traced_gate_weights(x)
        else:
            route = self.selector.route(x)
            if isinstance(route, int):
                tailor_B = tailor_B * self.tailor_coefficients(route)
            elif route is not None:
                gates = self.gate_weights(route)
        coefficients = None
        if gates is not None:  # per example: 1 on learngenes and the frozen term, the gate on tailors
            gates = gates.repeat_interleave(self.tailor_r, dim=1)
            coefficients = nn.functional.pad(gates, (self.learngene_A.shape[0], a.shape[0] // 2), value=1.0)
        b = torch.cat([self.learngene_B, tailor_B, self.constant("negated_B")], dim=1)
        return routed_update(base(x), x, a, b, coefficients)

    def traced_gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """gate_weights for code torch.compile traces, from ``TaskSelector.traced_ids`` (ids as a tensor,
        so every batch takes the per-example path): an example without a task gets the neutral gate, exactly
        1 on every tailor (with a zero gradient for G)."""
        count = self.selector.count
        ids = self.selector.traced_ids(x, required=False)  # ``count`` where no task is set
        gates = self.gate_weights(ids.clamp(max=count - 1))
        return torch.where(ids[:, None] < count, gates, torch.ones_like(gates))

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
