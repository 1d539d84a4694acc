"""tlora: Transformed Low-rank Adaptation via tensor decomposition (Tao et al., ICCV 2025, arXiv 2501.08727).

A learned full-rank, dense transform T of the pre-trained weight plus a compact residual::

    W' = W0 T + s·Δ            T: in x in, Tensor-Ring-Matrix (TRM) with identity init
                               Δ: out x in residual, LoRA (B A, code default) or Tensor Ring (TR)
    y = W0 (T x) + b + s·Δ x   s = alpha / √r (the code's rsLoRA scaling)

T is tensorised: in = I_1·…·I_D (big-endian index (i_1 … i_D), the code's kron/einsum order) and
T[(i), (j)] = tr(A¹[i_1, j_1] ⋯ A^D[i_D, j_D]) with cores A^d ∈ R^{I_d x I_d x R x R}; with transform
rank R = 1 it is the Kronecker product A¹ ⊗ … ⊗ A^D (the code's default). Cores start at
A^d[:, :, a, b] = I/R, so T = I (paper Prop. 1). The forward never forms T or W0 T: it applies T to
the activations mode by mode (O(in·ΣI_d·R²) per token) and calls the layer on the result::

    x ──► T (mode products with the cores) ──► base (W0 · + b) ──────────┐
    └───► residual: B A (or the TR contraction) ──────────────── · s ──► (+) ──► y

The TR residual (``residual="tr"``; the paper's TR, the code's "ttv"): out = O_1⋯O_P, in = J_1⋯J_Q,
Δ[(o), (j)] = tr(B¹[o_1] ⋯ B^P[o_P] C¹[j_1] ⋯ C^Q[j_Q]) with 3-way cores of rank r; B¹ = 0 (identity at
init), the other output cores ~ N(0, √O_d / r²), input cores ~ N(0, 1/√J_d) (the code's values).
The LoRA residual: B = 0, A ~ kaiming_normal(a = √5) (the code's, normal not uniform).

Trainable parameters per adapted layer: R²·Σ_d I_d² (transform; 0 with transform_rank 0) plus
r·(in + out) (LoRA residual) or r²·(ΣO_d + ΣJ_d) (TR residual). Defaults from the official scripts
(``run_tlora.sh``): r = 1, transform rank 1, LoRA residual, alpha 1, D = 3 modes, lr 1e-4; the code's
factorisations of SD widths (320: 4·8·10, 640: 8·8·10, 768: 8·8·12, 1280: 8·10·16, 2048: 8·16·16) are used
for those widths, other widths get the most balanced D-factorisation [peftlab] (4096 = 16·16·16,
11008 = 16·16·43). Llama-2-7B, all seven projections, 32 layers: 2,721,568 (q k v o only: 1,146,880).
The paper reports 0.40M parameters for TLoRA(2, 6) on SD (controllable generation; via a third-party
summary, the paper's tables were not readable here).

Official code: github.com/taozerui/tlora_diffusion (not retrievable here); peftlab follows the copy
in github.com/marcocst/PEFTDiff @ 9c56d00 (same README), ``subject-driven-generation/utils/
{attention_processor,utils}.py`` and ``run_tlora.{py,sh}``.

Deviations and notes:

* The code rebuilds W0 T + s·Δ densely every forward (an in x in x out product); peftlab computes
  W0 (T x) + s·Δx with the same result. ``tlora_dense_weight`` keeps the dense form as a reference.
  With transform rank 1, T x is D mode products (one GEMM each, ``kron_apply``), the LoRA residual one
  addmm onto the base output.
* The paper's optional identity regulariser R_I = Σ_d Σ_{a,b} ‖A^d[:, :, a, b] − I/R‖_F is offered as
  ``transform_reg`` (a loss weight; 0 = off, as in the code's training script). The code's TT-matrix
  residual ("ttm") is not implemented.
* The code tensorises only the widths in its table (SD) and asserts otherwise; peftlab factorises any
  width (a prime width gives one dense I x I core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

RESIDUALS = ("lora", "tr")
CODE_SHAPES = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16)}


def factorize(n: int, order: int) -> tuple[int, ...]:
    """The factorisation of n into ``order`` ascending factors with the smallest Σ f² (most balanced)."""
    best: tuple[int, tuple[int, ...]] | None = None

    def search(rest: int, parts: int, low: int, chosen: tuple[int, ...]):
        nonlocal best
        if parts == 1:
            if rest >= low:
                cand = chosen + (rest,)
                cost = sum(f * f for f in cand)
                if best is None or cost < best[0]:
                    best = (cost, cand)
            return
        f = low
        while f ** parts <= rest:
            if rest % f == 0:
                search(rest // f, parts - 1, f, chosen + (f,))
            f += 1

    search(n, order, 1, ())
    return best[1]


def tensor_shape(n: int, order: int, overrides: dict | None) -> tuple[int, ...]:
    if overrides and (str(n) in overrides or n in overrides):
        shape = tuple(overrides.get(str(n), overrides.get(n)))
        if math.prod(shape) != n:
            raise ValueError(f"tensor_shapes[{n}] = {shape} does not multiply to {n}")
        return shape
    if order == 3 and n in CODE_SHAPES:
        return CODE_SHAPES[n]
    return factorize(n, order)


def ring_apply(cores: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """TRM(cores) applied to the last dim of x: cores[d] (I_d, J_d, R, R), x (..., ΠJ_d) -> (..., ΠI_d)."""
    lead, n = x.shape[:-1], x[..., 0].numel()
    first = cores[0]
    i, j, r0, r1 = first.shape
    # state (n, done, R_0, R_current, rest): output modes done so far, input modes still to contract
    z = torch.einsum("njq,ijab->niabq", x.reshape(n, j, -1), first)
    for core in cores[1:]:
        i, j, rb, rc = core.shape
        done, rest = z.shape[1], z.shape[-1] // j
        z = torch.einsum("npabjq,ijbc->npiacq", z.reshape(n, done, r0, rb, j, rest), core)
        z = z.reshape(n, done * i, r0, rc, rest)
    z = z[..., 0].diagonal(dim1=-2, dim2=-1).sum(-1)  # close the ring: tr over (R_0, R_D)
    return z.reshape(*lead, -1)


def kron_apply(factors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(F_1 ⊗ … ⊗ F_D) applied to the last dim of x, mode by mode: F_d (I_d, J_d), x (..., ΠJ_d) -> (..., ΠI_d).

    Each mode is one GEMM on the activations in their own layout (the last mode a plain mm, the others a
    batched product with the factor shared), so nothing token-sized is permuted."""
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1])
    done = y.shape[0]  # tokens times the output modes already applied
    for d, factor in enumerate(factors):
        out_size, in_size = factor.shape
        rest = math.prod(f.shape[1] for f in factors[d + 1:])
        if rest == 1:
            y = y.reshape(-1, in_size) @ factor.T
        else:
            y = torch.matmul(factor, y.reshape(done, in_size, rest))
        done *= out_size
    return y.reshape(*lead, -1)


def ring_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """The dense TRM (ΠI_d x ΠJ_d): for references, merging and tests."""
    cols = math.prod(c.shape[1] for c in cores)
    return ring_apply(cores, torch.eye(cols, dtype=cores[0].dtype, device=cores[0].device)).T


def tr_factor(cores: list[torch.Tensor]) -> torch.Tensor:
    """Chain of 3-way ring cores (dim_d, R, R) -> (Πdim_d, R, R), big-endian, without the trace."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.einsum("pab,jbc->pjac", out, core).reshape(-1, out.shape[-2], core.shape[-1])
    return out


class TLoRAAdapter(LayerAdapter):
    def __init__(self, config: TLoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.fan_in, self.fan_out = fan_in, fan_out
        self.scale = config.alpha / math.sqrt(config.r)
        self.residual_kind = config.residual
        self.reg_weight = config.transform_reg
        in_shape = tensor_shape(fan_in, config.order, config.tensor_shapes)
        out_shape = tensor_shape(fan_out, config.order, config.tensor_shapes)
        rank, device = config.transform_rank, site.device
        self.transform = nn.ParameterList()
        for size in in_shape if rank > 0 else ():
            eye = torch.eye(size, device=device)[:, :, None, None].expand(size, size, rank, rank) / rank
            self.transform.append(nn.Parameter(eye.clone()))
        r = config.r
        if config.residual == "lora":
            self.lora_A = nn.Parameter(torch.zeros(r, fan_in, device=device))
            self.lora_B = nn.Parameter(torch.zeros(fan_out, r, device=device))
        else:
            self.out_cores = nn.ParameterList(nn.Parameter(torch.zeros(s, r, r, device=device)) for s in out_shape)
            self.in_cores = nn.ParameterList(nn.Parameter(torch.zeros(s, r, r, device=device)) for s in in_shape)
        if site.restoring:
            return
        with torch.no_grad():
            if config.residual == "lora":
                nn.init.kaiming_normal_(self.lora_A, a=math.sqrt(5))
            else:
                for core, size in zip(self.in_cores, in_shape):
                    core.normal_(0, 1 / math.sqrt(size))
                for d, (core, size) in enumerate(zip(self.out_cores, out_shape)):
                    if d > 0:
                        core.normal_(0, math.sqrt(size) / r**2)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.transform):
            return x
        if self.transform[0].shape[-1] == 1:  # R = 1: T is the Kronecker product of the cores
            return kron_apply([core[:, :, 0, 0].to(x.dtype) for core in self.transform], x)
        return ring_apply([core.to(x.dtype) for core in self.transform], x)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual_kind == "lora":
            return linear(linear(x, self.lora_A), self.lora_B)
        cin = tr_factor([c.to(x.dtype) for c in self.in_cores])  # (in, R, R)
        cout = tr_factor([c.to(x.dtype) for c in self.out_cores])  # (out, R, R)
        z = torch.einsum("...j,jab->...ab", x, cin)
        return torch.einsum("...ba,oab->...o", z, cout)  # tr(B-chain · C-chain)

    def forward(self, layer, x, base):
        out = base(self.transform_input(x))
        if self.residual_kind != "lora":
            return out + self.residual(x) * self.scale
        xa = linear(x.reshape(-1, self.fan_in), self.lora_A)  # the LoRA residual as one addmm, scale on B
        flat = torch.addmm(out.reshape(-1, self.fan_out), xa, (self.lora_B * self.scale).to(xa.dtype).T)
        return flat.view(out.shape)

    def residual_matrix(self) -> torch.Tensor:
        if self.residual_kind == "lora":
            return self.lora_B.float() @ self.lora_A.float()
        cin, cout = tr_factor([c.float() for c in self.in_cores]), tr_factor([c.float() for c in self.out_cores])
        return torch.einsum("oab,jba->oj", cout, cin)

    def transform_matrix(self) -> torch.Tensor | None:
        return ring_matrix([c.float() for c in self.transform]) if len(self.transform) else None

    def delta_weight(self, layer) -> torch.Tensor:
        w = weight_matrix(layer).detach().float()
        t = self.transform_matrix()
        moved = w @ t - w if t is not None else torch.zeros_like(w)
        return moved + self.scale * self.residual_matrix()

    def regularization(self) -> torch.Tensor | None:
        if not self.reg_weight or not len(self.transform):
            return None
        terms = []
        for core in self.transform:
            rank = core.shape[-1]
            eye = torch.eye(core.shape[0], device=core.device)[:, :, None, None] / rank
            terms.append(torch.linalg.vector_norm(core - eye, dim=(0, 1)).sum())  # subgradient 0 at I/R
        return self.reg_weight * torch.stack(terms).sum()


def tlora_dense_weight(adapter: TLoRAAdapter, layer: nn.Module) -> torch.Tensor:
    """W0 T + s·Δ, the official code's dense effective weight (reference)."""
    return weight_matrix(layer).detach().float() + adapter.delta_weight(layer)


@register
@dataclass
class TLoRA(LayerMethod):
    name: ClassVar[str] = "tlora"
    family: ClassVar[str] = "transform-domain"
    paper: ClassVar[str] = ("Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to "
                            "Text-to-image Models, arXiv 2501.08727")
    formula: ClassVar[str] = "R²·Σ I_d² (transform) + r·(in + out) (LoRA residual) or r²·(Σ O_d + Σ J_d) (TR)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True

    r: int = config_field(1, "rank of the residual (LoRA rank or TR rank)")
    transform_rank: int = config_field(1, "TRM rank R of the transform (1: Kronecker product; 0: no transform)")
    residual: str = config_field("lora", "lora (code default) | tr (the paper's tensor-ring residual)")
    alpha: float = config_field(1.0, "s = alpha / √r")
    order: int = config_field(3, "number of tensor modes D of each width")
    tensor_shapes: dict = field(default=None, metadata={"doc": "{width: [I_1, ..., I_D]} overrides"})
    transform_reg: float = config_field(0.0, "weight of the identity regulariser Σ‖A^d − I/R‖_F (paper; 0 = off)")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(isinstance(self.transform_rank, int) and self.transform_rank >= 0, self.name,
              f"transform_rank must be a non-negative integer, got {self.transform_rank!r}")
        check(self.residual in RESIDUALS, self.name, f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        check_positive_ints(self, "order")
        check(self.tensor_shapes is None or isinstance(self.tensor_shapes, dict), self.name,
              "tensor_shapes must be None or a dict {width: [factors]}")
        for width, shape in (self.tensor_shapes or {}).items():
            check(math.prod(shape) == int(width) and all(int(f) > 0 for f in shape), self.name,
                  f"tensor_shapes[{width}] = {shape} does not multiply to {width}")
        check(self.transform_reg >= 0, self.name, f"transform_reg must be >= 0, got {self.transform_reg}")

    def build(self, site: Site) -> LayerAdapter:
        return TLoRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        in_shape = tensor_shape(in_features, self.order, self.tensor_shapes)
        out_shape = tensor_shape(out_features, self.order, self.tensor_shapes)
        transform = self.transform_rank**2 * sum(f * f for f in in_shape)
        if self.residual == "lora":
            return transform + self.r * (in_features + out_features)
        return transform + self.r**2 * (sum(out_shape) + sum(in_shape))
