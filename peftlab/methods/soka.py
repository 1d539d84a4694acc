"""SoKA: a Kronecker-product SVD (KPSVD) of W0 initialises a sum of trainable Kronecker factors
(Chong, Qu 2025, arXiv 2506.15251).

W0 in R^{out x in} with out = m·p and in = n·q. The Van Loan–Pitsianis rearrangement
R(W)[i·n + j, k·q + l] = W[i·p + k, j·q + l] turns Kronecker products into rank-one matrices,
R(U ⊗ V) = vec(U) vec(V)ᵀ (row-major vec), so an SVD of R(W0) is a Kronecker-sum decomposition::

    R(W0) = Σ_k σ_k u_k v_kᵀ   ⇔   W0 = Σ_k σ_k U_k ⊗ V_k,   U_k = u_k as (m, n), V_k = v_k as (p, q)

and keeping the first r_kp terms is the Frobenius-optimal r_kp-term Kronecker fit. SoKA trains the top
terms, Â_k = √σ_k U_k (m x n) and B̂_k = √σ_k V_k (p x q), over a frozen residual::

    W = W_res + Σ_{k <= r_kp} Â_k ⊗ B̂_k,      W_res = W0 - Σ_{k <= r_kp} Â0_k ⊗ B̂0_k

peftlab keeps W0 (it never writes the base) and applies the whole effective matrix in one GEMM::

    W_eff = W0 + unR( [vec(Â − Â0), vec(Â0)] [vec(B̂), vec(B̂ − B̂0)]ᵀ )      y = W_eff x + b

The inner product is R(ΔW) = Σ_k vec(Â_k − Â0_k) vec(B̂_k)ᵀ + vec(Â0_k) vec(B̂_k − B̂0_k)ᵀ, i.e.
ΔW = Σ_k Â_k ⊗ B̂_k − Â0_k ⊗ B̂0_k, built per step in the compute dtype with one GEMM of inner size
2·r_kp; its two factors are exact zeros at init, so W_eff is W0 bit for bit and the output is the base.
Why dense: the factored form, vec(Â X B̂ᵀ) per token for 2·r_kp terms, costs 2·r_kp·m·q·(n+p) a token
(half to one dense GEMM at Llama widths, in small memory-bound GEMMs) and keeps r_kp·m·q values a
token (8-16x the width) for backward. The dense form adds only a per-step build of ΔW and the
weight-gradient GEMM Gᵀ X, which autograd maps back onto the factors through R; beyond x it keeps one
(out, in) matrix. Llama-3.2-1B, bf16, 8 x 1024 tokens, H200: step 2.77x -> 0.99x LoRA's, peak
59.7 -> 21.5 GiB (LoRA 19.8).
Precision: as in mixed-precision full fine-tuning, a bf16 W_eff rounds W0 + ΔW once per entry, so a ΔW
entry below half a bf16 step of W0 does not show in the forward until it grows (the fp32 factors keep
every optimizer step; the gradients see it at once). The forward does not call ``base``, so SoKA
cannot share its layers with another adapter (``stackable`` is False). ``disabled`` is the base exactly.

Rank selection per layer, on the KPSVD spectrum σ_1 >= ... >= σ_K (paper: "energy-threshold and
elbow-point criteria"; the exact rule is ours [peftlab]):
r_E = smallest k with Σ_{i<=k} σ_i² / Σ σ_i² >= tau; r_elbow = argmax_k of the distance from (k, σ_k)
to the chord joining (1, σ_1) and (K, σ_K); r_kp = clamp(min(r_E, r_elbow), 1, r_max). ``r=`` fixes
r_kp instead. Selection happens once, at init; no re-pruning during training (the paper's "dynamic"
is not specified).

Factor shapes [peftlab]: the most balanced divisors, m = the largest divisor of out <= √out, p = out/m,
and likewise n, q for in (4096 -> 64·64, 11008 -> 86·128). ``factor_shapes`` overrides (m, n) per
role, per "OUTxIN" or for all layers ("*"). A prime (or 1) size has no non-trivial split and is refused
(each term would degenerate to a rank-one outer product); a very unbalanced split is warned about.

Trainable parameters per adapted layer: r_kp·(m·n + p·q); 4096 x 4096 (64x64 ⊗ 64x64), r_kp = 4: 32,768.
Because r_kp depends on the weights, ``trainable_count`` is None unless ``r`` is fixed. The paper
reports 0.99M trainable parameters on LLaMA2-7B in total; its targets and r_kp are not recoverable.

Source: the paper's abstract and a third-party summary of its Algorithm 1; no official code has been
released, so there is no code commit to follow; the spec (shared/methods/soka.md) rules and marks our
own choices [peftlab]: the PiSSA-style residual, factor shapes, the rank rule's constants (tau = 0.9
placeholder, r_max = 8) and the defaults for training (the PiSSA protocol: q, k, v, o, gate, up, down;
lr 2e-5; 1 epoch). Re-check against the paper PDF before claiming a reproduction.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

UNBALANCED = 16  # warn when a split's larger factor side exceeds the smaller one this many times


def balanced_split(size: int) -> tuple[int, int]:
    """(a, size // a) with a the largest divisor of ``size`` not above √size."""
    a = math.isqrt(size)
    while size % a:
        a -= 1
    return a, size // a


def rearrange(weight: torch.Tensor, m: int, n: int, p: int, q: int) -> torch.Tensor:
    """Van Loan–Pitsianis R(W): (m·p, n·q) -> (m·n, p·q), with R(U ⊗ V) = vec(U) vec(V)ᵀ."""
    return weight.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m * n, p * q)


def unrearrange(matrix: torch.Tensor, m: int, n: int, p: int, q: int) -> torch.Tensor:
    """R⁻¹ as a 4-D (m, p, n, q) view of an (m·n, p·q) matrix: reshape(m·p, n·q) gives W."""
    return matrix.view(m, n, p, q).transpose(1, 2)


def kpsvd(weight: torch.Tensor, m: int, n: int, p: int, q: int):
    """(sigma, U, V): W = Σ_k sigma_k U_k ⊗ V_k with U (K, m, n), V (K, p, q), K = min(mn, pq)."""
    u, s, vh = torch.linalg.svd(rearrange(weight, m, n, p, q), full_matrices=False)
    return s, u.T.reshape(-1, m, n), vh.reshape(-1, p, q)


def select_rank(sigma: torch.Tensor, tau: float, r_max: int) -> int:
    """clamp(min(r_energy, r_elbow), 1, r_max) on a descending spectrum."""
    sigma = sigma.double()
    energy = sigma.pow(2)
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    r_energy = int((cumulative < tau - 1e-12).sum().item()) + 1
    count = sigma.numel()
    if count <= 2:
        r_elbow = 1
    else:  # the argmax of the perpendicular distance equals that of the vertical gap to the chord
        k = torch.arange(count, dtype=sigma.dtype, device=sigma.device)
        chord = sigma[0] + (sigma[-1] - sigma[0]) * k / (count - 1)
        r_elbow = int(torch.argmax((chord - sigma).abs()).item()) + 1
    return max(1, min(r_energy, r_elbow, r_max))


class SoKAAdapter(LayerAdapter):
    stackable: ClassVar[bool] = False  # the forward applies W0 + ΔW itself instead of calling ``base``

    def __init__(self, config: SoKA, site: Site):
        super().__init__()
        m, n, p, q = config.shapes(site.in_features, site.out_features, site.role, site.path)
        self.shape = (m, n, p, q)
        sigma, us, vs = kpsvd(site.weight(), m, n, p, q)
        rank = config.r if config.r is not None else select_rank(sigma, config.tau, config.r_max)
        if rank > sigma.numel():
            raise ConfigError(f"{config.name}: r={rank} exceeds the {sigma.numel()} Kronecker terms of "
                              f"{site.path} ({m}x{n} ⊗ {p}x{q})")
        root = sigma[:rank].sqrt()
        a0 = (root[:, None, None] * us[:rank]).contiguous()  # one layout for the trained and frozen copies,
        b0 = (root[:, None, None] * vs[:rank]).contiguous()  # so that their products cancel exactly at init
        self.register_buffer("sigma", sigma, persistent=False)  # the KPSVD spectrum, for inspection
        self.register_buffer("base_A", a0, persistent=False)  # the terms W_res removed
        self.register_buffer("base_B", b0, persistent=False)
        self.kron_A = nn.Parameter(a0.clone())  # (r_kp, m, n)
        self.kron_B = nn.Parameter(b0.clone())  # (r_kp, p, q)

    def forward(self, layer, x, base):
        return linear(x, self.effective_weight(layer, x.dtype), layer.bias)

    def effective_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """W0 + ΔW as an (out, in) matrix in ``dtype``; exactly W0 at init."""
        m, n, p, q = self.shape
        w = weight_matrix(layer).reshape(m, p, n, q).to(dtype)
        # ΔW stays a strided view: the add writes W's layout in one pass, without a copy of ΔW first.
        return (w + unrearrange(self.rearranged_delta(dtype), m, n, p, q)).reshape(m * p, n * q)

    def rearranged_delta(self, dtype: torch.dtype) -> torch.Tensor:
        """R(ΔW), (m·n, p·q), as one GEMM of inner size 2·r_kp: Σ_k vec(Â_k − Â0_k) vec(B̂_k)ᵀ +
        vec(Â0_k) vec(B̂_k − B̂0_k)ᵀ. The differences are taken in fp32, so every product is 0 at init."""
        left = torch.cat([self.kron_A - self.base_A, self.base_A]).flatten(1).to(dtype)
        right = torch.cat([self.kron_B, self.kron_B - self.base_B]).flatten(1).to(dtype)
        return left.T @ right

    def delta_weight(self, layer) -> torch.Tensor:
        m, n, p, q = self.shape
        return unrearrange(self.rearranged_delta(torch.float32), m, n, p, q).reshape(m * p, n * q)

    @property
    def rank(self) -> int:
        return self.kron_A.shape[0]


@register
@dataclass
class SoKA(LayerMethod):
    name: ClassVar[str] = "soka"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "SoKA, arXiv 2506.15251"
    formula: ClassVar[str] = "r_kp·(m·n + p·q), out = m·p, in = n·q; r_kp chosen per layer from the KPSVD spectrum"
    mergeable: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True  # the frozen terms and r_kp are recomputed from W0

    tau: float = config_field(0.9, "energy threshold of the rank rule (placeholder [peftlab])")
    r_max: int = config_field(8, "upper bound on Kronecker terms per layer")
    r: int | None = config_field(None, "fixed number of Kronecker terms per layer (None: energy/elbow rule)")
    factor_shapes: dict[str, Any] | None = config_field(
        None, "(m, n) of the first factor by role, by 'OUTxIN' or '*' (default: balanced divisors)")

    def validate(self) -> None:
        check(isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0, self.name,
              f"tau must be in (0, 1], got {self.tau!r}")
        check_positive_ints(self, "r_max")
        check(self.r is None or (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0),
              self.name, f"r must be a positive integer or None, got {self.r!r}")
        if self.factor_shapes is not None:
            check(isinstance(self.factor_shapes, dict), self.name, "factor_shapes must be a dict of key -> (m, n)")
            for key, value in self.factor_shapes.items():
                ok = (isinstance(value, (list, tuple)) and len(value) == 2
                      and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
                check(ok, self.name, f"factor_shapes[{key!r}] must be two positive integers (m, n), got {value!r}")

    def shapes(self, in_features: int, out_features: int, role: str | None = None,
               path: str = "") -> tuple[int, int, int, int]:
        """(m, n, p, q) of a layer: out = m·p, in = n·q."""
        chosen = None
        if self.factor_shapes:
            for key in (role, f"{out_features}x{in_features}", "*"):
                if key is not None and key in self.factor_shapes:
                    chosen = tuple(self.factor_shapes[key])
                    break
        where = f" at {path}" if path else ""
        if chosen is not None:
            m, n = chosen
            if out_features % m or in_features % n:
                raise ConfigError(f"{self.name}: factor shape ({m}, {n}) does not divide (out, in) = "
                                  f"({out_features}, {in_features}){where}")
            return m, n, out_features // m, in_features // n
        (m, p), (n, q) = balanced_split(out_features), balanced_split(in_features)
        if m == 1 or n == 1:
            size = out_features if m == 1 else in_features
            raise ConfigError(f"{self.name}: {size} has no non-trivial factorisation{where}, so Kronecker terms "
                              f"would degenerate to rank-one outer products; pass factor_shapes or leave the "
                              f"layer out of the targets")
        if p > UNBALANCED * m or q > UNBALANCED * n:
            warnings.warn(f"{self.name}: unbalanced Kronecker split {m}x{n} ⊗ {p}x{q} for (out, in) = "
                          f"({out_features}, {in_features}){where}", stacklevel=3)
        return m, n, p, q

    def build(self, site: Site) -> LayerAdapter:
        return SoKAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int | None:
        if self.r is None:
            return None  # r_kp is chosen from the weights; tests/methods/test_soka.py checks the count
        m, n, p, q = self.shapes(in_features, out_features, role)
        return self.r * (m * n + p * q)
