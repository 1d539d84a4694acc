"""LoLDU: frozen LU factors of W0, only the diagonal trains (Shi et al. 2024, arXiv 2410.13618).

LU with partial pivoting of the frozen weight (fp32), W0 in R^{out x in}, k = min(out, in)::

    W0 = P · L · diag(D) · U          P: permutation (out x out), L: unit lower (out x k, |L_ij| <= 1),
                                      D = diag of the LU's upper factor, U: unit upper (k x in)

LoLDU keeps the first r pivots, L_r = L[:, :r], U_r = U[:r], D_r = D[:r], and trains a vector
z in R^r that starts at D_r. The reference replaces W0 by the residual W_res = W0 - s·P L_r diag(D_r) U_r
and computes W = W_res + s·P L_r diag(z) U_r with s = alpha / r. peftlab never writes W0, so the same
function is computed as::

    x ─► base (W0 x + b) ─────────────────────────────────────┐
    └──► U_r ─► ⊙ s·(z - D_r) ─► L_r ─► gather rows by P ──► (+) ─► y

    y = W0 x + b + s · P L_r ((z - D_r) ⊙ (U_r x))

which is exactly the base at init (z = D_r) and equals W_res x + s·P L_r diag(z) U_r x + b at any z.
P is stored as an index vector (a row gather), never as a dense out x out matrix. When the batch has
so many tokens that the x-path costs more than building ΔW once (tokens·r·(in+out) > r·in·out +
tokens·in·out), the forward materialises ΔW = s·P L_r diag(z - D_r) U_r once and applies it densely.

Trainable parameters per adapted layer: r (the vector z; no bias).

Defaults follow the official code (github.com/SKDDJ/LoLDU, commit 4fe87a0, ``minloldu/loldu.py``):
``LoLDUParametrization.from_linear`` uses rank 4 and lora_alpha 1, hence s = 1/r; z starts at D_r
(``init_method="lu"``); targets are every projection (the code wraps every nn.Linear; peftlab's default
roles q k v o gate up down). The shipped ``default_loldu_config`` uses rank 768 (full rank on ViT-B),
so the paper likely often uses r = min(out, in): pass ``r=`` accordingly. Because s = 1/r multiplies z,
z moves W only by about s·lr per Adam step: use a larger learning rate than for LoRA.

The code's other z initialisations are offered as ``init`` (uniform ±mean/2, normal(mean, std of D_r),
constant mean, ones, zeros, s_uniform U(-1, 1), s_normal N(0, 1)). As in the code, the residual is
still built from the original D_r, so these start away from the base model.

Deviations from the official code, and why:

* W0 is kept and the removed part is subtracted in the forward (peftlab's invariant: adapters never
  write base weights); the computed function is the same. The code rebuilds the dense out x in update
  every forward and stores P as a dense float matrix; here both are factored.
* The code's ``scaling_factor`` is an nn.Parameter (but not in its trainable set); here it is a constant.
* The code's dropout is never applied in its forward, so there is no dropout option.
* A zero or non-finite pivot among the first r raises a ConfigError naming the layer (the code would
  silently produce inf/nan).
* Random z initialisations draw from a local torch.Generator (``seed`` option, or a seed drawn from
  torch's global RNG when None) instead of the global RNG directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import offset_generator

INITS = ("lu", "uniform", "normal", "constant", "ones", "zeros", "s_uniform", "s_normal")


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, L, D, U) with W = (L diag(D) U)[perm]: the LU with partial pivoting of an (out, in) matrix.

    ``perm`` is the row gather that applies P (P M = M[perm]); L is unit lower (out x k), U unit upper
    (k x in), k = min(out, in). Entries of D may be zero (then U has non-finite rows).
    """
    lu, pivots, _ = torch.linalg.lu_factor_ex(weight)  # zero pivots are reported below, not raised
    out, k = weight.shape[0], min(weight.shape)
    rows = list(range(out))  # LAPACK's row interchanges: row i was swapped with row pivots[i] - 1
    for i, p in enumerate(pivots.tolist()):
        rows[i], rows[p - 1] = rows[p - 1], rows[i]
    lower = torch.tril(lu[:, :k], -1) + torch.eye(out, k, dtype=lu.dtype, device=lu.device)
    upper = torch.triu(lu[:k])
    diag = upper.diagonal().clone()
    # weight[rows] = L U, so weight = (L U)[argsort(rows)]
    perm = torch.argsort(torch.tensor(rows, device=weight.device))
    return perm, lower, diag, upper / diag[:, None]


class LoLDUAdapter(LayerAdapter):
    def __init__(self, config: LoLDU, site: Site):
        super().__init__()
        r = config.r
        self.scale = config.scale
        perm, lower, diag, upper = ldu(site.weight())
        d_r, u_r = diag[:r], upper[:r]
        bad = ~(torch.isfinite(d_r) & (d_r != 0) & torch.isfinite(u_r).all(1))
        if bad.any():
            first = int(bad.nonzero()[0])
            raise ConfigError(f"{config.name}: LU pivot {first} of {site.path} is zero or not finite; "
                              f"choose r <= {first}")
        self.register_buffer("perm", perm, persistent=False)  # P as a row gather
        self.register_buffer("lower", lower[:, :r].contiguous(), persistent=False)  # L_r (out x r)
        self.register_buffer("upper", u_r.contiguous(), persistent=False)  # U_r (r x in)
        self.register_buffer("d0", d_r.clone(), persistent=False)  # D_r, what W_res removed
        self.z = nn.Parameter(d_r.clone())
        if site.restoring:
            return
        if config.init != "lu":
            with torch.no_grad():
                self.z.copy_(_reinit(config.init, d_r, offset_generator(config.seed, site.path)))

    def factor_delta(self) -> torch.Tensor:
        """s·(z - D_r), the diagonal of the update in LU coordinates (fp32)."""
        return self.scale * (self.z - self.d0)

    def forward(self, layer, x, base):
        out = base(x)
        fan_out, r = self.lower.shape
        fan_in = self.upper.shape[1]
        tokens = x.numel() // fan_in
        if tokens * r * (fan_in + fan_out) > r * fan_in * fan_out + tokens * fan_in * fan_out:
            return out + linear(x, self.delta_weight(layer))  # wide batch, full rank: one dense ΔW
        # Permuting L's rows (out x r) instead of the output keeps backward free of a scatter over tokens.
        h = linear(x, self.upper).reshape(-1, r) * self.factor_delta().to(x.dtype)
        flat = torch.addmm(out.reshape(-1, fan_out), h, self.lower[self.perm].to(h.dtype).T)
        return flat.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        """s·P L_r diag(z - D_r) U_r as (out, in) fp32."""
        return ((self.lower * self.factor_delta()) @ self.upper)[self.perm]

    def residual(self, layer) -> torch.Tensor:
        """The reference's W_res = W0 - s·P L_r diag(D_r) U_r, dense (for inspection and tests)."""
        removed = ((self.lower * (self.scale * self.d0)) @ self.upper)[self.perm]
        return weight_matrix(layer).detach().float() - removed


def _reinit(init: str, d_r: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The official code's alternative z initialisations (the residual still uses D_r)."""
    mean = d_r.mean().item()
    if init == "uniform":
        half = abs(mean) / 2
        return (torch.rand(d_r.shape, generator=gen) * 2 - 1).to(d_r) * half
    if init == "normal":
        std = d_r.std().item() if d_r.numel() > 1 else 0.0
        return (torch.randn(d_r.shape, generator=gen) * std + mean).to(d_r)
    if init == "constant":
        return torch.full_like(d_r, mean)
    if init == "ones":
        return torch.ones_like(d_r)
    if init == "zeros":
        return torch.zeros_like(d_r)
    if init == "s_uniform":
        return (torch.rand(d_r.shape, generator=gen) * 2 - 1).to(d_r)
    if init == "s_normal":
        return torch.randn(d_r.shape, generator=gen).to(d_r)
    raise ConfigError(f"loldu: unknown init {init!r}")


@register
@dataclass
class LoLDU(LayerMethod):
    name: ClassVar[str] = "loldu"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "LoLDU, arXiv 2410.13618"
    formula: ClassVar[str] = "r"
    mergeable: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True  # the frozen L, U, P, D_r are recomputed from W0

    r: int = config_field(4, "pivots kept: the trained diagonal has r entries (r <= min(in, out))")
    alpha: float = config_field(1.0, "scale numerator: s = alpha / r")
    init: str = config_field("lu", "z init: lu (D_r, identity at init) | " + " | ".join(INITS[1:]))
    seed: int | None = config_field(None, "seed of the random z inits (None: drawn from torch's global RNG)")

    @property
    def identity_at_init(self) -> bool:  # only z = D_r reproduces the base
        return self.init == "lu"

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(isinstance(self.alpha, (int, float)) and self.alpha != 0, self.name,
              f"alpha must be a non-zero number, got {self.alpha!r}")
        check(self.init in INITS, self.name, f"init must be one of {INITS}, got {self.init!r}")
        check(self.seed is None or isinstance(self.seed, int), self.name, "seed must be an integer or None")

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return LoLDUAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r
