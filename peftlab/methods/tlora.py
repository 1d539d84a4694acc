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
  With transform rank 1, T x is D mode products, each one GEMM on the activations in their row-major
  layout (the core broadcast over a batched GEMM, so nothing token-sized is permuted or copied;
  ``kron_apply``), and the LoRA residual is one addmm onto the base output. With the LoRA residual (the
  defaults) T x and s·x Aᵀ are one autograd function (``KronLowRank``), since autograd would keep the
  intermediate mode products for the cores' gradients (an earlier autograd version kept three copies
  of each projection's input: about 15 GiB more than LoRA on Llama-3.2-1B at 8k tokens). It saves only
  x and recomputes them in backward (D − 1 small-K GEMMs), carries s on GEMM alphas and adds the LoRA
  input gradient in place; all small factors reach the activations' dtype with one cat and one cast
  (``cast_together``). Eager step time follows the kernels launched: a step dispatches 21 ATen ops in
  fp32, 25 in bf16 (LoRA 11, 15; 42, 52 before).
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

from peftlab.core.layers import add_product, linear, weight_matrix
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


def kron_modes(factors: list[torch.Tensor], tokens: int) -> list[tuple[int, int, int, int]]:
    """(N, I_d, J_d, rest) of each mode product of a Kronecker transform applied to ``tokens`` rows: the
    operand of mode d is (N, J_d, rest) with N = tokens·I_1⋯I_{d-1} and rest = J_{d+1}⋯J_D."""
    shapes, done = [], tokens
    for d, factor in enumerate(factors):
        out_size, in_size = factor.shape
        shapes.append((done, out_size, in_size, math.prod(f.shape[1] for f in factors[d + 1:])))
        done *= out_size
    return shapes


def kron_mode(factor: torch.Tensor, y: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """One mode product F_d · y on (N, J_d, rest) -> (N, I_d, rest): a batched GEMM with F_d broadcast
    (stride 0, no copy) on the activations in their row-major layout, a plain mm for the last mode."""
    n, out_size, in_size, rest = shape
    if rest == 1:
        return torch.mm(y.reshape(n, in_size), factor.T).view(n, out_size, 1)
    return torch.bmm(factor.expand(n, out_size, in_size), y.reshape(n, in_size, rest))


def kron_apply(factors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(F_1 ⊗ … ⊗ F_D) applied to the last dim of x, mode by mode: F_d (I_d, J_d), x (..., ΠJ_d) -> (..., ΠI_d).

    Each mode is one GEMM on the activations in their own layout (``kron_mode``), so nothing token-sized
    is permuted or copied."""
    y = x.reshape(-1, x.shape[-1])
    for factor, shape in zip(factors, kron_modes(factors, y.shape[0])):
        y = kron_mode(factor, y, shape)
    return y.reshape(*x.shape[:-1], -1)


class KronLowRank(torch.autograd.Function):
    """(t, xa) = ((F_1 ⊗ … ⊗ F_D) x, s·x Aᵀ) for 2-D x, in x's dtype (``a`` may be None: t alone).

    Autograd through ``kron_apply`` would keep the D − 1 token-sized intermediate mode products for the
    factors' gradients; this saves only x and the factors and recomputes them in backward (D − 1 small-K
    GEMMs). Backward is the chain rule written out: per mode one GEMM for the input gradient and one
    (batched, then summed over the batch) for the factor's; the LoRA input gradient s·g_xa A is added
    in place onto the transform's, and s rides on GEMM alphas (no elementwise pass anywhere)."""

    @staticmethod
    def forward(ctx, x, a, scale, *factors):
        ctx.scale = scale
        ctx.save_for_backward(x, a, *factors)
        t = kron_apply(factors, x)
        if a is None:
            return t
        xa = torch.addmm(torch.empty(x.shape[0], a.shape[0], dtype=x.dtype, device=x.device), x, a.T,
                         beta=0, alpha=scale)  # beta 0: the uninitialised input is ignored
        return t, xa

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t, grad_xa=None):
        x, a, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shapes = kron_modes(factors, x.shape[0])
        inputs = [x]  # the operand of each mode, recomputed
        for factor, shape in zip(factors[:-1], shapes[:-1]):
            inputs.append(kron_mode(factor, inputs[-1], shape))
        grads: list[torch.Tensor | None] = [None] * len(factors)
        g = grad_t
        for d in reversed(range(len(factors))):
            factor, (n, out_size, in_size, rest), y = factors[d], shapes[d], inputs[d]
            if needs[3 + d]:
                if rest == 1:
                    grads[d] = torch.mm(g.reshape(n, out_size).T, y.reshape(n, in_size))
                else:
                    grads[d] = torch.bmm(g.reshape(n, out_size, rest), y.reshape(n, in_size, rest).mT).sum(0)
            if d == 0 and not needs[0]:
                break
            if rest == 1:
                g = torch.mm(g.reshape(n, out_size), factor)
            else:
                g = torch.bmm(factor.T.expand(n, in_size, out_size), g.reshape(n, out_size, rest))
        grad_x = grad_a = None
        if needs[0]:
            grad_x = g.view(x.shape)
            if a is not None and grad_xa is not None:
                grad_x.addmm_(grad_xa, a, alpha=ctx.scale)
        if a is not None and needs[1] and grad_xa is not None:
            grad_a = torch.addmm(torch.empty(a.shape, dtype=a.dtype, device=a.device), grad_xa.T, x,
                                 beta=0, alpha=ctx.scale)
        return grad_x, grad_a, None, *grads


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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an enabled autocast region runs GEMMs in on this device (None: no region, or a device
    autocast does not know)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def cast_together(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The small fp32 factors in the activations' dtype with one cat and one cast (and one of each in
    backward) instead of a cast per tensor; as they are when the dtype already matches."""
    if all(t.dtype == dtype for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


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

    def kron_factors(self) -> list[torch.Tensor]:
        """The rank-1 cores as (I_d, I_d) matrices (views: their gradient needs no copy)."""
        return [core.view(core.shape[0], core.shape[1]) for core in self.transform]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.transform):
            return x
        if self.transform[0].shape[-1] == 1:  # R = 1: T is the Kronecker product of the cores
            return self.fused_input(x.reshape(-1, self.fan_in))[0].view(*x.shape[:-1], -1)
        return ring_apply([core.to(x.dtype) for core in self.transform], x)

    def fused_input(self, x2d: torch.Tensor):
        """(T x, s·x Aᵀ, B) through ``KronLowRank``, all in the dtype the GEMMs run in: x's, or that of
        an enclosing autocast region (cast here, since autocast would not reach the function's backward);
        for the TR residual (T x, None, None)."""
        amp = autocast_dtype(x2d.device.type)
        if amp is None or x2d.dtype == torch.float64:
            return self._fused_input(x2d)
        with torch.autocast(x2d.device.type, enabled=False):
            return self._fused_input(x2d.to(amp))

    def _fused_input(self, x2d: torch.Tensor):
        if self.residual_kind != "lora":
            return KronLowRank.apply(x2d, None, 1.0, *cast_together(self.kron_factors(), x2d.dtype)), None, None
        *factors, a, b = cast_together([*self.kron_factors(), self.lora_A, self.lora_B], x2d.dtype)
        return *KronLowRank.apply(x2d, a, self.scale, *factors), b

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual_kind == "lora":
            return linear(linear(x, self.lora_A), self.lora_B)
        cin = tr_factor([c.to(x.dtype) for c in self.in_cores])  # (in, R, R)
        cout = tr_factor([c.to(x.dtype) for c in self.out_cores])  # (out, R, R)
        z = torch.einsum("...j,jab->...ab", x, cin)
        return torch.einsum("...ba,oab->...o", z, cout)  # tr(B-chain · C-chain)

    def forward(self, layer, x, base):
        if self.residual_kind != "lora":
            return base(self.transform_input(x)) + self.residual(x) * self.scale
        x2d = x.reshape(-1, self.fan_in)
        if len(self.transform) and self.transform[0].shape[-1] == 1:  # the default: one fused function
            t, xa, b = self.fused_input(x2d)
            out = base(t.view(x.shape))
        else:
            out = base(self.transform_input(x))
            a, b = cast_together([self.lora_A, self.lora_B * self.scale], x.dtype)
            xa = torch.mm(x2d, a.T)
        return add_product(out, xa, b)  # the LoRA residual as one addmm

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
