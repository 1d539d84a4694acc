"""svft: CLIP-SVD, training only the singular values of each adapted weight matrix.

Koleilat, Rivaz, Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models", arXiv 2509.03740
(v3: "CLIP-SVD: Efficient and Interpretable Vision-Language Adaptation via Singular Values").
Not to be confused with SVFT of Lingam et al. 2024 (arXiv 2405.19597), which trains a sparse matrix M
in U M Vᵀ: that is a different method; this registry entry is CLIP-SVD.

Each adapted W0 (out x in) is decomposed once, W0 = U diag(σ) Vᵀ (thin SVD of the fp32 weight, k
directions), and only the vector s of singular values trains::

    x ──► Vᵀ (k x in) ──► ⊙ s ──► U (out x k) ──► + b ──► y         s starts at σ; U, V, b frozen

    y = U (s ⊙ Vᵀx) + b  =  W0 x + b + U ((s − σ) ⊙ Vᵀx),        ΔW = U diag(s − σ) Vᵀ

Trainable parameters per adapted layer: k = min(in, out) (with ``rank_ratio`` ρ < 1:
k = ⌊⌊min(in, out)·ρ⌋ / m⌋·m clamped to [1, min(in, out)], m = ``rank_multiple``). A 4096 x 4096
layer: 4,096; CLIP ViT-B/16, every block linear of both towers: 92,160.

Forwards (same function when k = min(in, out), up to the SVD round-off of W0: ~1e-6 relative in fp32;
in bf16, the rounding of U and Vᵀ):

* ``forward="factored"`` (default): y = U(s ⊙ Vᵀx) + b, the official code's computation: two thin
  products, k·(in + out) multiply-adds per token in place of the base layer's in·out (W0 not used).
  It reads the layer's bias instead of calling ``base``, so it cannot be stacked with another adapter;
  s is cast to the activations' dtype, as mixed precision casts any weight.
* ``forward="delta"``: y = base(x) + U((s − σ) ⊙ Vᵀx). Exactly the base output at init (s − σ = 0),
  stackable with other adapters, never forms an out x in matrix; but the k-rank update comes on top of
  the base product: Llama-3.2-1B's training step (H200, bf16, 8 x 1024 tokens) takes 1.47x LoRA's,
  against 1.06x with ``factored``. The change s − σ is formed in fp32 before the cast to the
  activations' dtype, so in bf16 it is not rounded against σ.

A layer whose k is below min(in, out) (ρ < 1, or a ``rank_multiple`` that rounds k down) is
truncated as in the official code: W0's tail directions are dropped, not kept as a residual. Such a
layer always computes the factored path (W0 itself is never modified); the model then differs from
the base at init and ``identity_at_init`` is False for ρ < 1 or m > 1.

Defaults, from the official code (github.com/HealthX-Lab/CLIP-SVD, commit 022b1ed,
``svf_utils/svf_torch.py`` and ``svf_utils/utils.py``): ρ = 1 (CLI ``--rank``), every linear of
every transformer block (q, k, v, attention output, both MLP linears; here the seven LLaMA roles),
s initialised to σ exactly, no scaling hyperparameter, no regulariser or training hook. The paper's
recipe otherwise: AdamW (0.9, 0.999), lr 5e-4, weight decay 0.01, cosine to 1e-6 without warm-up.

Deviations and notes:

* The official code rounds k down to a multiple of 4 (``round_to_nearest``), which drops up to 3
  directions when min(in, out) is not divisible by 4; peftlab's default keeps k = min(in, out)
  exactly, and ``rank_multiple=4`` reproduces the code.
* The code replaces the layer by two ``nn.Linear``s (Vᵀ, then U carrying b); peftlab keeps the
  layer and holds U, Vᵀ as non-persistent buffers in the weight's dtype (recomputed from W0 on load;
  the SVD itself always runs in fp32), σ in fp32.
* The official code splits packed q/k/v projections (nn.MultiheadAttention's in_proj) before the
  SVD. peftlab sees one module per projection on LLaMA-like models; on fused projections (GPT-2's
  ``c_attn``) it takes one SVD of the fused matrix, which is a different method: target the
  unfused projections where the paper's behaviour matters.
* Weight decay on s pulls singular values toward 0, not toward σ (the paper's wd 0.01 keeps that);
  s is not clamped to be positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

FORWARDS = ("factored", "delta")


def kept_rank(in_features: int, out_features: int, ratio: float, multiple: int) -> int:
    """k: the official code's ``round_to_nearest(min(in, out), ratio, base_number=multiple)``."""
    full = min(in_features, out_features)
    k = (math.floor(full * ratio) // multiple) * multiple
    return min(max(k, 1), full)


class SVFTAdapter(LayerAdapter):
    def __init__(self, config: CLIPSVD, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        k = kept_rank(fan_in, fan_out, config.rank_ratio, config.rank_multiple)
        self.truncated = k < min(fan_in, fan_out)
        self.factored = config.forward == "factored" or self.truncated
        self.stackable = not self.factored  # the factored path adds the bias itself, ignoring ``base``
        u, sigma, vh = torch.linalg.svd(site.weight(), full_matrices=False)
        store = site.dtype if site.dtype.is_floating_point else torch.float32
        self.register_buffer("u", u[:, :k].contiguous().to(store), persistent=False)  # out x k
        self.register_buffer("vh", vh[:k].contiguous().to(store), persistent=False)  # k x in
        self.register_buffer("sigma", sigma[:k].contiguous(), persistent=False)  # fp32
        self.s = nn.Parameter(sigma[:k].clone())  # deterministic: also right when restoring

    def forward(self, layer, x, base):
        coords = linear(x, self.vh)  # Vᵀx, k per token
        if self.factored:
            return linear(coords * self.s.to(coords.dtype), self.u, layer.bias)
        out = base(x)  # the sum is fused into the U-GEMM (addmm)
        shift = (coords * (self.s - self.sigma).to(coords.dtype)).reshape(-1, coords.shape[-1])
        flat = torch.addmm(out.reshape(shift.shape[0], -1), shift, self.u.to(shift.dtype).T)
        return flat.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        u, vh = self.u.float(), self.vh.float()
        if self.factored:
            return (u * self.s.float()) @ vh - weight_matrix(layer).detach().float()
        return (u * (self.s.float() - self.sigma)) @ vh


@register
@dataclass
class CLIPSVD(LayerMethod):
    name: ClassVar[str] = "svft"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "CLIP-SVD (Singular Value Few-shot Adaptation of VLMs), arXiv 2509.03740"
    formula: ClassVar[str] = "min(in, out)  (k = ⌊⌊min(in,out)·rank_ratio⌋ / rank_multiple⌋·rank_multiple)"
    mergeable: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True

    rank_ratio: float = config_field(1.0, "ρ: keep k = ⌊min(in, out)·ρ⌋ singular values; ρ < 1 truncates W0 (lossy)")
    rank_multiple: int = config_field(1, "round k down to a multiple of this (official code: 4)")
    forward: str = config_field("factored", "factored: U(s⊙Vᵀx) + b (the code's) | delta: base(x) + U((s−σ)⊙Vᵀx) "
                                            "(exactly the base at init, stackable; slower)")

    @property
    def identity_at_init(self) -> bool:  # truncation (ρ < 1 or rounding) changes the model at init
        return self.rank_ratio == 1.0 and self.rank_multiple == 1

    def validate(self) -> None:
        check(isinstance(self.rank_ratio, (int, float)) and 0.0 < self.rank_ratio <= 1.0, self.name,
              f"rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        check_positive_ints(self, "rank_multiple")
        check(self.forward in FORWARDS, self.name, f"forward must be one of {FORWARDS}, got {self.forward!r}")

    def build(self, site: Site) -> LayerAdapter:
        return SVFTAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return kept_rank(in_features, out_features, self.rank_ratio, self.rank_multiple)
