"""wara: WaRA, Wavelet Low-Rank Adaptation (Heidari et al. 2025, arXiv 2506.24092, v1).

WaRA performs the low-rank factorisation in a wavelet domain and reconstructs the update with the
inverse transform. The paper's one explicit formula (v1, Fig. 1): the input X (d1 x k) is decomposed by
a 2-D DWT into the subbands {C_LL, C_LH, C_HL, C_HH}, each is mapped by one shared low-rank pair
A_w ∈ R^{r x d1/2}, B_w ∈ R^{d2/2 x r}, and X̂ = W⁻¹(B_w A_w C) (d2 x k) is reconstructed by the
inverse DWT. The transform along the token axis is orthogonal and cancels (IDWT_t ∘ DWT_t = I, the
map acts on the feature axis only), so this is exactly a weight update — no token mixing::

    ΔW = s · Σ_{a ∈ {lo, hi}} G_aᵀ (B A) F_a         s = alpha / r
         F_lo, F_hi: ⌈in/2⌉ x in  one-level orthonormal DWT of the input features (analysis halves)
         G_lo, G_hi: ⌈out/2⌉ x out the same on the output side, applied transposed (synthesis)

    x ──► DWT (filter bank) ──► [x_lo; x_hi] ──► A (r x in/2) ──► B (out/2 x r) ──► IDWT ──► · s ──► (+) ──► y

Both subbands go through the same A and B; the transforms are the fast filter-bank DWT (periodic
extension, so F = [F_lo; F_hi] is orthogonal). The forward folds them into the factors instead of
transforming every token: ΔW = s·B̂ Â with Â = [A F_lo; A F_hi] (2r x in) and B̂ = [G_loᵀ B, G_hiᵀ B]
(out x 2r), rebuilt per call from the small factors, so a token costs a rank-2r LoRA product
(``update`` keeps the filter-bank form on activations as the reference and for merging). The rebuild
is the synthesis (inverse DWT) of the rows of A and of Bᵀ in polyphase form: with filter taps
h_a[2q + p] (L = 2Q taps, a ∈ {lo, hi}),

    (A F_a)[j, 2i + p] = Σ_q h_a[2q + p] · A[j, (i − q) mod in/2]

i.e. one broadcast product of A (and its Q − 1 circular shifts) with a (2, 2, Q) tap tensor, summed
over q — Haar (Q = 1): one multiply; db2 (Q = 2): roll, stack, multiply, sum — instead of a
zeros/roll/stack sequence per tap, because an eager training step is launch-bound (every ATen op of
every adapted layer is a kernel launch, forward and backward). The rows of Â come interleaved per
rank, (j, lo), (j, hi), and so do the columns of B̂ (its taps carry s): the products come out as
(r, 2, in/2, 2) and (out/2, 2, r, 2), i.e. Â and s·B̂ row-major, which the GEMMs take without a copy.
All in fp32 elementwise arithmetic (adapter master weights; a strided conv_transpose1d would save an op
per factor but runs in TF32 under cuDNN's default), then cast to the activations' dtype; the sum with
the base output is fused into the B̂-GEMM (addmm).
With the Haar wavelet the pair reduces to (B A) ⊗ I₂ in the interleaved (even, odd) feature layout
— an identity worth knowing: the Haar transform only re-indexes; ``wavelet="db2"`` gives a genuine
multi-resolution mixing. Odd sizes are zero-padded by one (input) / cropped (output).

Trainable parameters per adapted layer: r·(⌈in/2⌉ + ⌈out/2⌉), half of LoRA at the same r.
Llama-2-7B, r = 8, all seven projections, 32 layers: 9,994,240 (q k v o only: 4,194,304).

Official code: github.com/moeinheidari7829/WaRA — not retrievable here (no snapshot, nothing in the code
index). Everything below that is not the paper's formula is peftlab's choice [peftlab]:

* [peftlab] one DWT level (the paper's shapes d/2 imply one level), Haar by default (db2 offered),
  periodic extension, zero-pad/crop for odd sizes;
* [peftlab] init as LoRA (A Kaiming-uniform a = √5, B = 0: identity at init), s = alpha / r with
  peftlab's LoRA defaults r = 8, alpha = 16, dropout 0.05 (no defaults are stated for language models);
* the later v2 of the paper (2026) describes a ViT-specific variant (patch grid DWT, Tiny-WaRA); not
  implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import low_rank_update
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

WAVELETS = ("haar", "db2")


def wavelet_filters(name: str) -> tuple[list[float], list[float]]:
    """(lowpass h, highpass g) analysis filters of an orthonormal Daubechies wavelet, g_k = (−1)^k h_{L−1−k}."""
    if name == "haar":
        low = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    elif name == "db2":
        r3 = math.sqrt(3)
        low = [(1 + r3) / (4 * math.sqrt(2)), (3 + r3) / (4 * math.sqrt(2)),
               (3 - r3) / (4 * math.sqrt(2)), (1 - r3) / (4 * math.sqrt(2))]
    else:
        raise ValueError(f"unknown wavelet {name!r}")
    high = [(-1) ** k * low[len(low) - 1 - k] for k in range(len(low))]
    return low, high


def dwt(x: torch.Tensor, low: list[float], high: list[float]) -> torch.Tensor:
    """One-level periodic DWT over the last dim (even length n): (..., 2, n/2), [lowpass, highpass]."""
    lo = sum(c * torch.roll(x, -k, dims=-1)[..., ::2] for k, c in enumerate(low))
    hi = sum(c * torch.roll(x, -k, dims=-1)[..., ::2] for k, c in enumerate(high))
    return torch.stack((lo, hi), dim=-2)


def idwt(bands: torch.Tensor, low: list[float], high: list[float]) -> torch.Tensor:
    """Inverse of ``dwt`` (its transpose): (..., 2, n/2) -> (..., n)."""
    lo, hi = bands[..., 0, :], bands[..., 1, :]
    n = 2 * lo.shape[-1]
    out = None
    for k, (cl, ch) in enumerate(zip(low, high)):
        spread = torch.zeros(*lo.shape[:-1], n, dtype=lo.dtype, device=lo.device)
        spread[..., ::2] = cl * lo + ch * hi
        spread = torch.roll(spread, k, dims=-1)
        out = spread if out is None else out + spread
    return out


def dwt_matrix(n: int, wavelet: str, dtype=torch.float64) -> torch.Tensor:
    """The (n x n) analysis matrix [F_lo; F_hi] of ``dwt`` (n even): for references and tests."""
    low, high = wavelet_filters(wavelet)
    return dwt(torch.eye(n, dtype=dtype), low, high).reshape(n, n).T  # row a·n/2 + i = F_a[i]


def polyphase_taps(name: str) -> torch.Tensor:
    """(2, 2, Q) float64 taps T[a, p, q] = h_a[2q + p] (a = lo, hi; L = 2Q filter taps): the synthesis
    x ↦ x F_a in polyphase form, (x F_a)[2i + p] = Σ_q T[a, p, q] · x[(i − q) mod n/2]."""
    return torch.tensor(wavelet_filters(name), dtype=torch.float64).view(2, -1, 2).transpose(1, 2)


def synthesize(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_q taps[..., q] · roll(x, q, dim), broadcast as x[:, None, :, None] · taps: (k0, u, k1, v) for 2-D x
    (k0, k1) and taps (u, 1, v, Q). Rows of A (dim 1, taps (a, 1, p, q)): [j, a, i, p] = (A F_a)[j, 2i + p];
    columns of B (dim 0, taps (p, 1, a, q)): [i, p, j, a] = (G_aᵀ B)[2i + p, j]. Haar (Q = 1) is one
    multiply (backward: one multiply, one sum)."""
    if taps.shape[-1] == 1:
        return x[:, None, :, None] * taps[..., 0]
    shifted = torch.stack([x] + [x.roll(q, dim) for q in range(1, taps.shape[-1])], dim=-1)
    return (shifted[:, None, :, None] * taps).sum(-1)


class WaRAAdapter(LayerAdapter):
    def __init__(self, config: WaRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.fan_in, self.fan_out = fan_in, fan_out
        self.half_in, self.half_out = (fan_in + 1) // 2, (fan_out + 1) // 2
        self.low, self.high = wavelet_filters(config.wavelet)
        self.scale = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(config.r, self.half_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(self.half_out, config.r, device=site.device))
        taps = polyphase_taps(config.wavelet)  # [a, p, q], recomputable: non-persistent fp32 buffers
        taps_in, taps_out = taps[:, None], self.scale * taps.permute(1, 0, 2)[:, None]  # (a, 1, p, q), (p, 1, a, q)
        # contiguous: the broadcast products then come out in the layout the views in folded_factors need
        self.register_buffer("taps_in", taps_in.float().contiguous().to(site.device), persistent=False)
        self.register_buffer("taps_out", taps_out.float().contiguous().to(site.device), persistent=False)
        if site.restoring:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in % 2:
            x = nn.functional.pad(x, (0, 1))
        bands = dwt(x, self.low, self.high)  # (..., 2, in/2)
        mapped = nn.functional.linear(nn.functional.linear(bands, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return idwt(mapped, self.low, self.high)[..., : self.fan_out] * self.scale

    def folded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â, s·B̂), fp32, with ΔW = s·B̂ Â: Â (2r x in) has rows A F_lo, A F_hi interleaved per rank
        ((j, lo), (j, hi), ...), s·B̂ (out x 2r) the matching columns s·G_loᵀ B, s·G_hiᵀ B; see the module
        docstring. Odd sizes: the padded feature is cropped (Â's last column, B̂'s last row)."""
        r = self.lora_A.shape[0]
        a = synthesize(self.lora_A.float(), self.taps_in, dim=1).view(2 * r, 2 * self.half_in)
        b = synthesize(self.lora_B.float(), self.taps_out, dim=0).view(2 * self.half_out, 2 * r)
        if self.fan_in % 2:
            a = a[:, : self.fan_in]
        if self.fan_out % 2:
            b = b[: self.fan_out]
        return a, b

    def forward(self, layer, x, base):
        """base(x) + s·B̂ Â x: the transforms are folded into the small factors (a rank-2r pair, no token-sized
        DWT), which go where LoRA's would: into the layer's own product when alone on it, without dropout
        and for enough tokens (core.layers.low_rank_update), else one addmm onto base(x)."""
        a, b = self.folded_factors()
        return low_rank_update(layer, x, base, a, b, folded=folds_into(layer), dropout=self.dropout)

    def delta_weight(self, layer) -> torch.Tensor:
        eye = torch.eye(self.fan_in, device=self.lora_A.device)
        return self.update(eye).T.float()  # column j = ΔW e_j


@register
@dataclass
class WaRA(LayerMethod):
    name: ClassVar[str] = "wara"
    family: ClassVar[str] = "transform-domain"
    paper: ClassVar[str] = "WaRA: Wavelet Low Rank Adaptation, arXiv 2506.24092"
    formula: ClassVar[str] = "r·(⌈in/2⌉ + ⌈out/2⌉)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True

    r: int = config_field(8, "rank of the shared subband map B A")
    alpha: float = config_field(16.0, "s = alpha / r")
    dropout: float = config_field(0.05, "dropout on the adapter's input")
    wavelet: str = config_field("haar", "haar | db2: one-level orthonormal DWT, periodic extension")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.wavelet in WAVELETS, self.name, f"wavelet must be one of {WAVELETS}, got {self.wavelet!r}")

    def build(self, site: Site) -> LayerAdapter:
        taps = len(wavelet_filters(self.wavelet)[0])
        if min(site.features) < taps:
            raise ConfigError(f"{self.name}: {self.wavelet} needs layers of at least {taps} features, {site.path} "
                              f"has {site.features}")
        return WaRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * ((in_features + 1) // 2 + (out_features + 1) // 2)
