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

Two forwards (``forward``), the same function up to the SVD round-off of W0 (~1e-6 relative in fp32;
in bf16, the rounding of U and Vᵀ)::

    direct (default, the reference's):  y = W' x + b                W0 unused
    delta:                              y = base(x) + ΔW x,         ΔW = U (ReLU(Σ') − diag(σ)) Vᵀ

(the off-diagonal blocks of Σ' are zero, so ReLU splits blockwise: ΔW = U_top diag(ReLU(a⊙σ_top + c) −
σ_top) V_topᵀ + U_tail (ReLU(M) − diag(σ_tail)) V_tailᵀ, M = diag(σ_tail) + X Y). ``delta`` equals the
base exactly at init and stacks with other adapters, but it pays a full-rank update on top of the base
layer's product (in training about twice the base layer's multiply-adds again), where ``direct``
replaces the base product. In bf16 ``delta`` keeps the small change precise (formed apart from W0);
``direct`` rounds the whole spectrum, as mixed precision rounds any weight. ``disabled`` is the base
in both.

The spectrum S (ReLU(Σ'), or ReLU(Σ') − diag(σ) for delta) is applied in one of three orders
(``path``), the same function, with z = Vᵀx::

    dense:     (U S Vᵀ) x                 the out x in product rebuilt per call, cached in eval mode
    folded:    U' (V'ᵀ x)                 S folded into the one of U, Vᵀ on the smaller side of the layer
    subspace:  U (S z)                    nothing out x in is formed

Per call they cost (multiply-adds; T tokens, k = min(in, out), forward only) dense k·in·out + k³ +
T·in·out, folded k³ + T·k·(in + out), subspace T·k·(in + out + k); backward about doubles each and adds
the weight gradient of the trained product (T·in·out, T·k², T·k²). ``"auto"`` (default) folds in
training once a call has more than k tokens and takes the subspace path below that, and uses the
cached product in eval mode. Dense costs fewer multiply-adds than folded on square layers of long
batches, but ran slower in training on an H200. X Y is formed in the activations' dtype (off the
diagonal ReLU(M) is ReLU(X Y)). Merge for deployment.

No factored "ReLU on the diagonal only" path is offered: it is a different function once XY has
negative entries.

Initialisation (current SAM2 layer, the default ``init="default"``): a = 1, c = 0, Y = 0, X Kaiming-
uniform (fan_in = r_lora, ReLU gain) = U(−√(6/r_lora), √(6/r_lora)) (the code's a = √20 is ignored by
PyTorch for ReLU). Σ' = diag(σ) ≥ 0 at init, so ReLU is a no-op and the output is the base's (up
to the round-off above for ``direct``).
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

Deviations: ``forward="delta"`` keeps W0 and adds the spectral change (above); U, Vᵀ are
non-persistent buffers in the weight's dtype computed at injection from the loaded weight and
recomputed on load (the reference
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

from peftlab.core.layers import add_product, linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

INITS = ("default", "v1")
PATHS = ("auto", "dense", "folded", "subspace")
FORWARDS = ("direct", "delta")


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
        self.r, self.path = r, config.path
        self.direct = config.forward == "direct"
        self.stackable = not self.direct  # the direct forward reads the layer's bias instead of calling ``base``
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

    # -- the spectrum ------------------------------------------------------------------------------

    def spectrum(self, dtype: torch.dtype = torch.float32, change: bool = False) -> torch.Tensor:
        """ReLU(Σ') (k x k) in ``dtype``; with ``change``, less diag(σ) (the change to W0's spectrum).

        X Y is formed with X, Y zero-padded to k rows / columns: the top and off-diagonal blocks come out
        0 as in Σ', and every product keeps dimensions of k (t = k − r is odd-sized, and GPU matrix
        kernels slow down several-fold on such strides). For the change, the diagonal, where a small
        change meets σ, is formed in fp32 so that the rounding to ``dtype`` keeps it."""
        x = nn.functional.pad(self.X.to(dtype), (0, 0, self.r, 0))  # k x r_lora
        y = nn.functional.pad(self.Y.to(dtype), (self.r, 0))  # r_lora x k
        product = x @ y
        top_sigma, tail_sigma = self.sigma[: self.r], self.sigma[self.r:]
        top = torch.addcmul(self.shift.float(), self.scale.float(), top_sigma)
        if not change:  # Σ' = X Y + diag(a ⊙ σ_top + c, σ_tail); the product is not kept for backward
            product.diagonal().add_(torch.cat([top, tail_sigma]).to(dtype))
            return torch.relu(product)
        tail = torch.relu(tail_sigma + (self.X.float() * self.Y.float().T).sum(1)) - tail_sigma
        diagonal = torch.cat([torch.relu(top) - top_sigma, tail])
        return torch.relu(product).diagonal_scatter(diagonal.to(dtype))

    def singular_matrix(self) -> torch.Tensor:
        """ReLU(Σ') as the reference builds it (k x k, fp32): for tests and inspection."""
        return self.spectrum()

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with L R = W' (direct) or ΔW (delta): U and Vᵀ with the spectrum folded into the one on the
        smaller side of the layer, where folding costs k³ and the trained product is k x k per token."""
        u, vh = self.u.to(dtype), self.vh.to(dtype)
        spectrum = self.spectrum(dtype, change=not self.direct)
        if vh.shape[1] <= u.shape[0]:  # in <= out
            return u, spectrum @ vh
        return u @ spectrum, vh

    def _product(self, dtype: torch.dtype) -> torch.Tensor:
        left, right = self._factors(dtype)
        return left @ right

    def _coordinates(self, flat: torch.Tensor) -> torch.Tensor:
        """The spectrum applied to z = Vᵀx in the singular coordinates (tokens x k)."""
        z = linear(flat, self.vh)
        return linear(z, self.spectrum(z.dtype, change=not self.direct))

    def _tracks_gradients(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _cached_product(self, dtype: torch.dtype) -> torch.Tensor:
        """L R, kept in eval mode until a parameter changes (dropped when the adapter is set to training);
        compiled code builds it in the graph (dynamo cannot compare data pointers)."""
        if self.training or self._tracks_gradients() or torch.compiler.is_compiling():
            return self._product(dtype)
        params = (self.scale, self.shift, self.X, self.Y)
        key = (dtype, self.u.device, self.u.data_ptr(), *((p.data_ptr(), p._version) for p in params))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._product(dtype))
        return self._cache[1]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _path(self, tokens: int) -> str:
        if self.path != "auto":
            return self.path
        if not (self.training or self._tracks_gradients()):
            return "dense"  # the cached product: one product per token and nothing to build
        # Folding costs k³ per call (again in backward), the subspace path k² per token in each of its three
        # products with the spectrum (forward, input and weight gradient) against folded's one: fold once a
        # call has more than k tokens. Dense, fewer multiply-adds on square layers, ran slower than folded.
        return "folded" if tokens > min(self.u.shape[0], self.vh.shape[1]) else "subspace"

    # -- LayerAdapter ------------------------------------------------------------------------------

    def forward(self, layer, x, base):
        flat = x.reshape(-1, x.shape[-1])
        path = self._path(flat.shape[0])
        if path == "dense":
            update, basis = flat, self._cached_product(x.dtype)
        elif path == "folded":
            left, right = self._factors(x.dtype)
            update, basis = linear(flat, right), left
        else:
            update, basis = self._coordinates(flat), self.u.to(x.dtype)
        if self.direct:  # y = W'x + b: W0 is not used
            return linear(update, basis, layer.bias).view(*x.shape[:-1], -1)
        out = base(x)  # y = base(x) + ΔW x, the sum riding on the last product (addmm)
        return add_product(out, update, basis)

    def delta_weight(self, layer) -> torch.Tensor:
        product = self._product(torch.float32)
        return product - weight_matrix(layer).detach().float() if self.direct else product

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
    path: str = config_field("auto", "order of the products, same function: auto (cheapest for the call) | dense "
                                     "(out x in product per call, cached in eval) | folded | subspace")
    forward: str = config_field("direct", "direct: y = U ReLU(Σ') Vᵀ x + b, W0 unused (the reference's) | delta: "
                                          "base(x) + ΔW x (exactly the base at init, stackable)")

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
        check(self.forward in FORWARDS, self.name, f"forward must be one of {FORWARDS}, got {self.forward!r}")

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
