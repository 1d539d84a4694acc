"""salt: SALT, scale and shift the top singular values, low-rank update inside the tail spectrum.

Elsayed, Hashmi, Elseiagy, Wang, Yaqub, Almakky, "SALT: Singular Value Adaptation with Low-Rank
Transformation", arXiv 2503.16055 (BMVC 2025). Official code: github.com/BioMedIA-MBZUAI/SALT, commit
7314877: ``prompt_adapted_SAM2/modeling/Adapters/SALT.py`` (the current layer, SAM2's default; followed
here), ``prompt_adapted_segment_anything/modeling/SALT.py`` (the older SAM-v1 layer), ``train.py``,
``SALT_config.yml``. Formulas are from the code (the paper's full text was not read).

With k = min(in, out) and the fp32 thin SVD W0 = U diag(σ) Vᵀ (frozen), split at r = max(1, ⌊ratio·k⌋)
(top) and t = k − r (tail)::

            ┌ diag(a ⊙ σ[:r] + c)        0             ┐  r        a, c ∈ R^r          (scale, shift)
    Σ'  =   │                                           │
            └        0            diag(σ[r:]) + X Y   ┘  t        X ∈ R^{t x r_lora}, Y ∈ R^{r_lora x t}

    W' = U · ReLU(Σ') · Vᵀ,    y = W' x + b          ReLU over ALL k² entries of Σ' (also XY's off-diagonal)

Trainable: a, c, X, Y; 2r + 2·t·r_lora per adapted layer. 4096 x 4096, ratio 0.1, r_lora 256: r = 409,
t = 3687, 818 + 1,887,744 = 1,888,562.

peftlab computes W' as W0 plus the change it makes to the spectrum (same function, up to SVD round-off)::

    y = base(x) + ΔW x,    ΔW = U (ReLU(Σ') − diag(σ)) Vᵀ
                              = U_top diag(ReLU(a⊙σ_top + c) − σ_top) V_topᵀ + U_tail (ReLU(M) − diag(σ_tail)) V_tailᵀ,
                                M = diag(σ_tail) + X Y

(the off-diagonal blocks of Σ' are zero, so ReLU splits blockwise). The model then equals the base
exactly at init, ``disabled`` is the base, and SALT stacks with other adapters; the reference computes
W' x + b directly, which differs from this by the SVD round-off of W0 (~1e-6 relative in fp32).

Forward paths (``path``), both the reference's function (ReLU over every entry of Σ'):

* ``"dense"`` (default, the reference's computation): rebuild the out x in ΔW every call
  (t²·min(in, out) + out·k·in multiply-adds: the t x t block multiplies the smaller singular-vector
  matrix first) and apply it as one addmm onto the base output; in eval mode the rebuilt ΔW is cached until a
  parameter changes (and dropped when the adapter is set to training). Merge for deployment.
* ``"subspace"``: the same function computed through the k singular coordinates, never forming an
  out x in matrix: z = Vᵀx; y = base(x) + U [δ_top ⊙ z_top ; (ReLU(M) − diag σ_tail) z_tail], costing
  a t x t rebuild per call plus k·(in + out) + t² per token. Cheaper for short batches on large layers.

No factored "ReLU on the diagonal only" path is offered: it is a different function once XY has
negative entries.

Initialisation (current SAM2 layer, the default ``init="default"``): a = 1, c = 0, Y = 0, X Kaiming-
uniform (fan_in = r_lora, ReLU gain) = U(−√(6/r_lora), √(6/r_lora)) (the code's a = √20 is ignored by
PyTorch for ReLU). Σ' = diag(σ) ≥ 0 at init, so ReLU is a no-op and the output is the base's.
``init="v1"``: the SAM-v1 layer's X, Y ~ 0.01·N(0, 1) (NOT identity at init; the v1 layer's integer
rank is not offered, use ``ratio``). The reference reseeds the global RNG with 42 in every layer
(``torch.manual_seed(42)``), so all same-shaped layers get the same X; peftlab draws from a local
generator seeded with ``seed`` per layer instead (same values as the reference on CPU, global RNG
untouched); ``seed=None`` draws from the global RNG (different X per layer).

Regulariser (optional, the layer's second output in the reference): R = ‖(a − 1) ⊙ σ_top + c‖₂ +
‖X Y‖_F (pre-ReLU, norms not squared), summed over layers; loss += λ·R with λ = ``reg_multiplier``,
default 0 as in ``SALT_config.yml`` (then ``regularization`` returns None). ‖XY‖_F is computed from
r_lora x r_lora Grams (‖XY‖_F² = Σ (XᵀX) ⊙ (YYᵀ)), never the t x t product.

Defaults (SAM2 code): ratio 0.1, r_lora 256, every block linear (here: q, k, v, o, gate, up, down),
λ 0. Recipe: AdamW lr 1e-4, weight decay 1e-2 on all trainables (it pulls a toward 0, not 1),
batch 8, 200 epochs, constant lr in practice.

Deviations: W0 kept and the spectral change added (above); U, Vᵀ are non-persistent buffers in the
weight's dtype computed at injection from the loaded weight and recomputed on load (the reference
re-runs the SVD on the first forward and keeps plain attributes); singular-vector signs are made
canonical (largest-magnitude entry of each right singular vector positive) so that saved X, Y keep
their meaning when the SVD is recomputed on another backend. The reference's SAM2 targets include the
fused qkv projection (one SVD of the fused matrix), which peftlab also does on GPT-2's c_attn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

INITS = ("default", "v1")
PATHS = ("dense", "subspace")


def split(in_features: int, out_features: int, ratio: float) -> tuple[int, int]:
    """(r, t): top singular values scaled/shifted and tail size, as ``SALTLinear`` computes them."""
    k = min(in_features, out_features)
    r = max(1, int(k * ratio))
    return r, max(0, k - r)


def canonical_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD with each pair (u_i, v_i) signed so that v_i's largest-magnitude entry is positive."""
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    pivot = vh.gather(1, vh.abs().argmax(1, keepdim=True)).squeeze(1)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(vh.dtype)
    return u * sign, sigma, vh * sign[:, None]


class SALTAdapter(LayerAdapter):
    def __init__(self, config: SALT, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        r, t = split(fan_in, fan_out, config.ratio)
        self.r, self.t, self.path = r, t, config.path
        u, sigma, vh = canonical_svd(site.weight())
        store = site.dtype if site.dtype.is_floating_point else torch.float32
        self.register_buffer("u", u.contiguous().to(store), persistent=False)  # out x k
        self.register_buffer("sigma", sigma.contiguous(), persistent=False)  # k, fp32
        self.register_buffer("vh", vh.contiguous().to(store), persistent=False)  # k x in
        self.scale = nn.Parameter(torch.ones(r))  # a
        self.shift = nn.Parameter(torch.zeros(r))  # c
        self.X = nn.Parameter(torch.zeros(t, config.r_lora))
        self.Y = nn.Parameter(torch.zeros(config.r_lora, t))
        self._cache: tuple | None = None
        if site.restoring:
            return
        gen = None if config.seed is None else torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            if config.init == "v1":
                self.X.copy_(torch.randn(self.X.shape, generator=gen) * 0.01)
                self.Y.copy_(torch.randn(self.Y.shape, generator=gen) * 0.01)
            elif t > 0:
                nn.init.kaiming_uniform_(self.X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu", generator=gen)

    # -- the spectral change -----------------------------------------------------------------------

    def top_change(self) -> torch.Tensor:
        """ReLU(a ⊙ σ_top + c) − σ_top (r), fp32."""
        top = self.sigma[: self.r]
        return torch.relu(self.scale.float() * top + self.shift.float()) - top

    def tail_change(self) -> torch.Tensor:
        """ReLU(diag(σ_tail) + X Y) − diag(σ_tail) (t x t), fp32."""
        tail = torch.diag(self.sigma[self.r:])
        return torch.relu(tail + self.X.float() @ self.Y.float()) - tail

    def singular_matrix(self) -> torch.Tensor:
        """ReLU(Σ') as the reference builds it (k x k, fp32): for tests and inspection."""
        k = self.sigma.shape[0]
        full = torch.zeros(k, k, device=self.sigma.device)
        full[: self.r, : self.r] = torch.diag(self.top_change() + self.sigma[: self.r])
        full[self.r:, self.r:] = self.tail_change() + torch.diag(self.sigma[self.r:])
        return full

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        """U [δ_top; C_tail] Vᵀ, with the t x t tail change C multiplied into the smaller side first
        (t²·min(in, out) multiply-adds, then one out·k·in product)."""
        u, vh = self.u.to(dtype), self.vh.to(dtype)
        top, tail = self.top_change().to(dtype), self.tail_change().to(dtype)
        if vh.shape[1] <= u.shape[0]:  # in <= out: C Vᵀ_tail is the cheaper product
            right = torch.cat([top[:, None] * vh[: self.r], tail @ vh[self.r:]])
            return u @ right
        left = torch.cat([u[:, : self.r] * top, u[:, self.r:] @ tail], dim=1)
        return left @ vh

    def _cached_delta(self, dtype: torch.dtype) -> torch.Tensor:
        params = (self.scale, self.shift, self.X, self.Y)
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self._delta(dtype)
        key = (dtype, self.u.device, self.u.data_ptr(), *((p.data_ptr(), p._version) for p in params))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._delta(dtype))
        return self._cache[1]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    # -- LayerAdapter ------------------------------------------------------------------------------

    def forward(self, layer, x, base):
        out = base(x)
        flat = x.reshape(-1, x.shape[-1])
        if self.path == "dense":  # the sum is fused into the ΔW-GEMM (addmm)
            y = torch.addmm(out.reshape(flat.shape[0], -1), flat, self._cached_delta(x.dtype).T)
            return y.view(out.shape)
        z = linear(flat, self.vh)
        top = z[:, : self.r] * self.top_change().to(z.dtype)
        tail = linear(z[:, self.r:], self.tail_change())
        y = torch.addmm(out.reshape(flat.shape[0], -1), torch.cat([top, tail], dim=-1), self.u.to(z.dtype).T)
        return y.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        return self._delta(torch.float32)

    def penalty(self) -> torch.Tensor:
        """R = ‖(a − 1) ⊙ σ_top + c‖₂ + ‖X Y‖_F (pre-ReLU), fp32."""
        top = torch.linalg.vector_norm((self.scale.float() - 1) * self.sigma[: self.r] + self.shift.float())
        with torch.autocast(self.X.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            x, y = self.X.float(), self.Y.float()
            squared = ((x.T @ x) * (y @ y.T)).sum().clamp_min(0)  # ‖XY‖_F² from r_lora x r_lora Grams
        lora = torch.where(squared > 0, squared.clamp_min(1e-30).sqrt(), squared.new_zeros(()))
        return top + lora


@register
@dataclass
class SALT(LayerMethod):
    name: ClassVar[str] = "salt"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "SALT, arXiv 2503.16055"
    formula: ClassVar[str] = "2r + 2·t·r_lora  (r = max(1, ⌊ratio·min(in,out)⌋), t = min(in,out) − r)"
    mergeable: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = True

    ratio: float = config_field(0.1, "share of min(in, out) singular values scaled and shifted (r = ⌊ratio·k⌋)")
    r_lora: int = config_field(256, "rank of the X Y update of the tail block")
    reg_multiplier: float = config_field(0.0, "λ: loss += λ·Σ_layers (‖(a−1)⊙σ_top + c‖ + ‖XY‖_F); 0 = off")
    init: str = config_field("default", "default (a=1, c=0, X Kaiming, Y=0: identity) | v1 (X, Y ~ 0.01·N(0,1))")
    seed: int | None = config_field(42, "seed of each layer's local init generator (reference: 42); None: global RNG")
    path: str = config_field("dense", "dense: rebuild ΔW per call, cached in eval (reference) | subspace: same "
                                      "function through the singular coordinates")

    @property
    def identity_at_init(self) -> bool:
        return self.init == "default"

    def validate(self) -> None:
        check(isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0, self.name,
              f"ratio must be in (0, 1], got {self.ratio!r}")
        check_positive_ints(self, "r_lora")
        check(isinstance(self.reg_multiplier, (int, float)) and self.reg_multiplier >= 0, self.name,
              f"reg_multiplier must be a non-negative number, got {self.reg_multiplier!r}")
        check(self.init in INITS, self.name, f"init must be one of {INITS}, got {self.init!r}")
        check(self.seed is None or isinstance(self.seed, int), self.name, f"seed must be an integer or None, "
              f"got {self.seed!r}")
        check(self.path in PATHS, self.name, f"path must be one of {PATHS}, got {self.path!r}")

    def build(self, site: Site) -> LayerAdapter:
        return SALTAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        r, t = split(in_features, out_features, self.ratio)
        return 2 * r + 2 * t * self.r_lora

    def regularization(self, adapters: dict[str, nn.Module]) -> torch.Tensor | None:
        layers = [a for a in adapters.values() if isinstance(a, SALTAdapter)]
        if not layers or self.reg_multiplier == 0:
            return None
        return self.reg_multiplier * torch.stack([a.penalty() for a in layers]).sum()
