"""sorsa: SORSA, trainable principal singular triplets with an orthonormal regulariser.

Yang Cao, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large
Language Models", arXiv 2409.00055. Official code: github.com/Gunale0926/SORSA, commit 809cca0
(``sorsalib/src/sorsa/layer.py``: layer, init, merge and ``calc_ortho``; ``sorsalib/src/sorsa/trainer.py``
~line 2656: where the regulariser enters; ``scripts/train_sorsa.sh``: the released hyperparameters).

With the thin SVD W0 = U diag(σ) Vᵀ (fp32), the top r triplets become trainable::

    B = U[:, :r] (out x r),   S = σ[:r] (r),   A = V[:, :r]ᵀ (r x in)       all three train
    W_r = W0 − c·B0 diag(S0) A0                                             frozen residual
    y = W_r x + c·B (S ⊙ A·dropout(x)) + b,    c = alpha / r, or 1 when alpha is None (the default)

peftlab never modifies W0: it keeps W0 and subtracts the frozen principal part (B0, S0, A0 = the
initial values, non-persistent buffers recomputed from W0) as a low-rank term::

    y = base(x) + c·B (S ⊙ A·dropout(x)) − c·B0 (S0 ⊙ A0 x),        ΔW = c·(B diag(S) A − B0 diag(S0) A0)

so the output equals the base exactly at init and ``disabled`` gives the base. The forward is
factored (never forms out x in; the official code rebuilds (B ⊙ S) @ A every call, same function).
Without dropout it computes the same ΔW as one rank-2r product, c·[BS − B0S0, B0S0]·[A; A − A0]
(both blocks are exact zeros at init), with the sum fused into the GEMM as in LoRA.

Trainable parameters per adapted layer: r·(in + out + 1); 4096 x 4096 at the released r = 128:
1,048,704.

Orthonormal regulariser (the method's second half)::

    L_orth = (1/2N) Σ_layers ( ‖A Aᵀ − I_r‖_F + ‖Bᵀ B − I_r‖_F )     N adapted layers, norms NOT squared

The official trainer applies it once per optimizer step, after gradient accumulation and AFTER
gradient clipping, via ``accelerator.backward((γ/lr0)·L_orth)`` (accelerate divides every backward
by the accumulation count G), then steps the optimizer. peftlab does exactly that in the config's
``before_optimizer_step``: grad += (γ / (peak_lr·G))·∇L_orth on every A and B (unclipped; S gets
nothing), lr0 = ``step.peak_lr`` (the configured lr, not the scheduled one), G = ``step.accumulation``.
The coefficient therefore depends on G (released run: 4e-4 / (3e-5·64) ≈ 0.208 relative to the
micro-batch-mean task gradient). ``orth_mode="loss"`` instead adds γ·L_orth to every micro-batch's
loss through ``regularization`` (γ used as given, clipped with the task gradient): a non-reference
form for training loops without the step hook. Steps with peak_lr ≤ 0 get no regulariser.

Defaults (released ``scripts/train_sorsa.sh`` / library): r 128 (library default 4), alpha None
(c = 1), dropout 0, γ 4e-4, targets q, k, v, o, gate, up, down (the library's ["query", "key", "value"]
default is a BERT leftover). Recipe: AdamW lr 3e-5, weight decay 0 (keep it off S), cosine with 3%
warm-up, clip 1.0, batch 2 x 64 accumulation, 1 epoch of 100k MetaMathQA rows.

Deviations: the official code takes the SVD of W0ᵀ and maps its factors (same triplets up to signs,
which cancel in every product); its ``weight.to(float32)`` is a no-op so a bf16 base is decomposed in
bf16, whereas peftlab always decomposes the fp32 copy; the reference stores W_r in bf16, peftlab
keeps W0 and the fp32 principal factors (exact identity at init instead of bf16 rounding of W_r).
L_orth is always evaluated in fp32 with autocast disabled (also in ``orth_mode="loss"``, where the
trainer calls ``regularization`` inside its autocast region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, TrainingStep, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.stacked import gram_gaps, shape_groups

ORTH_MODES = ("step", "loss")


class SORSAAdapter(LayerAdapter):
    def __init__(self, config: SORSA, site: Site):
        super().__init__()
        r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        u, sigma, vh = torch.linalg.svd(site.weight(), full_matrices=False)
        a0, s0, b0 = vh[:r].contiguous(), sigma[:r].contiguous(), u[:, :r].contiguous()
        self.register_buffer("base_A", a0, persistent=False)
        self.register_buffer("base_S", s0, persistent=False)
        self.register_buffer("base_B", b0, persistent=False)
        # Deterministic init (no random numbers), so it is also right when restoring.
        self.A = nn.Parameter(a0.clone())  # r x in
        self.S = nn.Parameter(s0.clone())  # r
        self.B = nn.Parameter(b0.clone())  # out x r

    def forward(self, layer, x, base):
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return self.fused_forward(x, base)
        h = linear(self.dropout(x), self.A)
        update = linear(h * self.S.to(h.dtype), self.B)
        h0 = linear(x, self.base_A)
        principal = linear(h0 * self.base_S.to(h0.dtype), self.base_B)
        return base(x) + (update - principal) * self.scale

    def fused_forward(self, x, base):
        """base(x) + c·[BS − B0S0, B0S0]·[A; A − A0] x: the same ΔW as one rank-2r product (both blocks
        are exact zeros at init) with the sum fused into the second GEMM; needs one input for both paths."""
        out = base(x)
        a = torch.cat([self.A, self.A - self.base_A])
        principal = self.base_B * self.base_S
        b = torch.cat([self.B * self.S - principal, principal], dim=1) * self.scale
        xa = linear(x.reshape(-1, a.shape[1]), a)
        flat = torch.addmm(out.reshape(xa.shape[0], -1), xa, b.to(xa.dtype).T)
        return flat.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        current = (self.B.float() * self.S.float()) @ self.A.float()
        return self.scale * (current - (self.base_B * self.base_S) @ self.base_A)

    def residual_weight(self, layer) -> torch.Tensor:
        """W_r = W0 − c·B0 diag(S0) A0: the reference's frozen weight (fp32, (out, in))."""
        return weight_matrix(layer).detach().float() - self.scale * (self.base_B * self.base_S) @ self.base_A


FactorGroup = tuple[str, list[nn.Parameter]]  # ("A" or "B", the factors of that name sharing shape and dtype)


def factor_groups(adapters) -> list[FactorGroup]:
    """The A and B factors, grouped by shape so that each group stacks into one tensor."""
    mods = [a for a in adapters if isinstance(a, SORSAAdapter)]
    groups = []
    for name in ("A", "B"):
        factors = [getattr(a, name) for a in mods]
        groups += [(name, [factors[i] for i in group]) for group in shape_groups(factors)]
    return groups


def deviations(stacked: torch.Tensor, name: str) -> torch.Tensor:
    """‖A Aᵀ − I‖_F or ‖Bᵀ B − I‖_F of each matrix of a stack of A or B factors, in fp32."""
    with torch.autocast(stacked.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
        rank = stacked.shape[1 if name == "A" else 2]
        return torch.linalg.matrix_norm(gram_gaps(stacked.float(), name == "A", torch.eye(rank, device=stacked.device)))


def mean_deviation(groups: list[FactorGroup], stacks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([deviations(stacked, name) for (name, _), stacked in zip(groups, stacks)]).mean()


def orthonormal_loss(adapters) -> torch.Tensor | None:
    """L_orth: the mean over all A and B matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (``calc_ortho``);
    differentiable in every A and B."""
    groups = factor_groups(adapters)
    if not groups:
        return None
    return mean_deviation(groups, [torch.stack(factors) for _, factors in groups])


def orthonormal_gradients(groups: list[FactorGroup]) -> list[torch.Tensor]:
    """∇L_orth per group, stacked like the group. Differentiates the stacks (fresh leaves) rather than the
    parameters, so autograd hands back one tensor per group instead of one per parameter."""
    with torch.no_grad():
        stacks = [torch.stack(factors).requires_grad_() for _, factors in groups]
    with torch.enable_grad():
        return list(torch.autograd.grad(mean_deviation(groups, stacks), stacks))


def add_to_grads(params: list[nn.Parameter], update: torch.Tensor) -> None:
    """p.grad += update[i] with one foreach op; a parameter without a gradient takes its slice of
    ``update`` (a view: no per-parameter copy)."""
    slices = update.unbind(0)
    accumulated = [(p.grad, s) for p, s in zip(params, slices) if p.grad is not None]
    for p, s in zip(params, slices):
        if p.grad is None:
            p.grad = s
    if accumulated:
        grads, additions = zip(*accumulated)
        torch._foreach_add_(list(grads), list(additions))


@register
@dataclass
class SORSA(LayerMethod):
    name: ClassVar[str] = "sorsa"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "SORSA, arXiv 2409.00055"
    formula: ClassVar[str] = "r·(in + out + 1)"
    mergeable: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True

    r: int = config_field(128, "rank: principal singular triplets made trainable (released script: 128)")
    alpha: float | None = config_field(None, "scale c = alpha / r; None: c = 1 (code default)")
    dropout: float = config_field(0.0, "dropout on the trainable path's input")
    gamma: float = config_field(4e-4, "orthonormal regulariser γ (0: off)")
    orth_mode: str = config_field("step", "step: grad += γ/(peak_lr·G)·∇L_orth after clipping (reference) | "
                                          "loss: loss += γ·L_orth every micro-batch")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0), self.name,
              f"alpha must be None or positive, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.gamma, (int, float)) and self.gamma >= 0, self.name,
              f"gamma must be a non-negative number, got {self.gamma!r}")
        check(self.orth_mode in ORTH_MODES, self.name, f"orth_mode must be one of {ORTH_MODES}, got {self.orth_mode!r}")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return SORSAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features + 1)

    def regularization(self, adapters: dict[str, nn.Module]) -> torch.Tensor | None:
        if self.orth_mode != "loss" or self.gamma == 0:
            return None
        loss = orthonormal_loss(adapters.values())
        return None if loss is None else self.gamma * loss

    def before_optimizer_step(self, adapters: dict[str, nn.Module], step: TrainingStep) -> None:
        """grad += (γ / (peak_lr·G))·∇L_orth on every A and B: after clipping, once per optimizer step."""
        if self.orth_mode != "step" or self.gamma == 0 or step.peak_lr <= 0:
            return
        mods = [a for a in adapters.values() if isinstance(a, SORSAAdapter) and a.A.requires_grad]
        groups = factor_groups(mods)
        if not groups:
            return
        coefficient = self.gamma / (step.peak_lr * max(step.accumulation, 1))
        with torch.no_grad():
            for (_, params), gradient in zip(groups, orthonormal_gradients(groups)):
                add_to_grads(params, gradient.mul_(coefficient))
