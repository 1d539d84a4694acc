"""tlora: Transformed Low-rank Adaptation via tensor decomposition (Tao et al., ICCV 2025, arXiv 2501.08727).

A learned full-rank, dense transform T of the pre-trained weight plus a compact residual::

    W' = W0 T + s·Δ            T: in x in, Tensor-Ring-Matrix (TRM) with identity init
                               Δ: out x in residual, LoRA (B A, code default) or Tensor Ring (TR)
    y = W0 (T x) + b + s·Δ x   s = alpha / √r (the code's rsLoRA scaling)

T is tensorised: in = I_1·…·I_D (big-endian index (i_1 … i_D), the code's kron/einsum order) and
T[(i), (j)] = tr(A¹[i_1, j_1] ⋯ A^D[i_D, j_D]) with cores A^d ∈ R^{I_d x I_d x R x R}; with transform
rank R = 1 it is the Kronecker product A¹ ⊗ … ⊗ A^D (the code's default). Cores start at
A^d[:, :, a, b] = I/R, so T = I (paper Prop. 1). T is applied by mode products with the cores, to the
activations before the layer or, with R = 1 and the LoRA residual, to W0's rows (see the notes)::

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

* The code rebuilds W0 T + s·Δ densely every forward (an in x in x out product); peftlab computes the same
  function for less. ``tlora_dense_weight`` keeps the dense form as a reference. With transform rank 1, a
  call follows a ``TransformPlan``: runs of consecutive modes are merged into one factor, their Kronecker
  product (``merge_modes``: at most in x in, built under autograd from the fp32 cores, so its gradient
  reaches them through kron's backward), and T is one mode product per merged factor (``kron_apply``: a
  batched GEMM with the factor broadcast for all but the last, a plain mm for the last; nothing
  token-sized is permuted or copied). One group is the dense T (one GEMM each way, K = in); D groups are
  the plain mode-by-mode product (K = I_d, batched GEMMs of tiny matrices). The merged product goes
  - on the activations (``KronLowRank``): T x and s·x Aᵀ are one autograd function that saves only x and
    recomputes the intermediate mode products in backward (autograd would keep them for the factors'
    gradients: an earlier version kept three copies of each projection's input, about 15 GiB more than
    LoRA on Llama-3.2-1B at 8k tokens), carries s on GEMM alphas and adds the LoRA input gradient in
    place; base(T x) then takes the residual as one addmm. The TR residual and R > 1 always run here.
  - or folded into the weight (``FoldedKron``; LoRA residual, the adapter alone on a plain linear layer
    whose weight and bias are frozen and in the GEMMs' dtype): y = x (W0 T + s·B A)ᵀ + b is one product
    of the layer's size each way, as in LoRA's folded path, and the mode products run on W0's out rows
    (W0 T = (Tᵀ W0ᵀ)ᵀ) instead of the tokens. The price is the weight's gradient G = gᵀ x (tokens·in·out
    multiply-adds), from which A and B get theirs as low-rank products and the factors theirs by the
    mode products' chain rule on the rows. W0 T + s·B A is built again in backward, not kept.
  ``plan_transform`` picks the grouping and the placement of least modelled cost (``plan_cost``), in
  units of a mode product's operand traffic (one element read and one written per row x in entry): a
  mode product costs that traffic, times K / balance once its merged factor's size K makes it
  compute-bound, times a penalty when it is a batched GEMM, plus a launch cost; a step takes
  D forward products, D − 1 recomputed ones, D factor and D input gradients (a batched factor gradient
  also writes its (batch, K, K) products). On the activations the LoRA residual adds 2·tokens·(in + out);
  folded, the rows are W0's and the weight's gradient adds tokens·in·out / balance. The constants
  (``COST_MODELS``) are per device kind: CUDA's model an H100 in bf16 (``benchmarks/gpu/tlora_probe.py``
  times every plan; its batched-GEMM penalty is still an estimate), under which, at 8192 tokens on
  Llama-3.2-1B, q, k, v, o fold with T dense on their 2048 rows, down folds with F_1 | F_2 ⊗ F_3, and
  gate and up stay on the activations with T dense (three plain GEMMs a step: T x, its input gradient
  and T's), while at 256 tokens nothing folds; on a CPU the mode-by-mode product on the activations
  mostly wins. ``TLoRAAdapter.plan_override`` pins a plan (tests, the probe); all plans compute the same
  function (fp64 tests). All small factors reach the GEMMs' dtype with one cat and one cast
  (``cast_together``).
* The paper's optional identity regulariser R_I = Σ_d Σ_{a,b} ‖A^d[:, :, a, b] − I/R‖_F is offered as
  ``transform_reg`` (a loss weight; 0 = off, as in the code's training script). The code's TT-matrix
  residual ("ttm") is not implemented.
* The code tensorises only the widths in its table (SD) and asserts otherwise; peftlab factorises any
  width (a prime width gives one dense I x I core).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.inject import folds_into
from peftlab.core.layers import add_product, frozen_in, linear, weight_matrix
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
        shapes.append((done, out_size, in_size, math.prod([f.shape[1] for f in factors[d + 1:]])))
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


def kron_operands(factors: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The operand of every mode product of ``kron_apply`` on 2-D x: x, then the partial products but the last."""
    operands = [x]
    for factor, shape in zip(factors[:-1], kron_modes(factors, x.shape[0])[:-1]):
        operands.append(kron_mode(factor, operands[-1], shape))
    return operands


def mode_gradient(grad: torch.Tensor, operand: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The gradient of F_d from its mode product's output gradient and operand: one GEMM over all rows for
    the last mode, else a batched one summed over the batch."""
    n, out_size, in_size, rest = shape
    if rest == 1:
        return torch.mm(grad.reshape(n, out_size).T, operand.reshape(n, in_size))
    return torch.bmm(grad.reshape(n, out_size, rest), operand.reshape(n, in_size, rest).mT).sum(0)


def mode_input_gradient(factor: torch.Tensor, grad: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    n, out_size, in_size, rest = shape
    if rest == 1:
        return torch.mm(grad.reshape(n, out_size), factor)
    return torch.bmm(factor.T.expand(n, in_size, out_size), grad.reshape(n, out_size, rest))


def kron_backward(factors: list[torch.Tensor], operands: list[torch.Tensor], grad: torch.Tensor,
                  needs_factors: list[bool], needs_input: bool) -> tuple[torch.Tensor | None, list]:
    """The chain rule of ``kron_apply`` on 2-D x written out, from the operands (``kron_operands``): x's
    gradient (None unless ``needs_input``) and each factor's (None where not needed)."""
    shapes = kron_modes(factors, operands[0].shape[0])
    grads: list[torch.Tensor | None] = [None] * len(factors)
    for d in reversed(range(len(factors))):
        if needs_factors[d]:
            grads[d] = mode_gradient(grad, operands[d], shapes[d])
        if d == 0 and not needs_input:
            return None, grads
        grad = mode_input_gradient(factors[d], grad, shapes[d])
    return grad.view(operands[0].shape), grads


class KronLowRank(torch.autograd.Function):
    """(t, xa) = ((F_1 ⊗ … ⊗ F_D) x, s·x Aᵀ) for 2-D x, in x's dtype (``a`` may be None: t alone).

    Autograd through ``kron_apply`` would keep the D − 1 token-sized intermediate mode products for the
    factors' gradients; this saves only x and the factors and recomputes them in backward (D − 1 GEMMs).
    Backward is the chain rule written out (``kron_backward``); the LoRA input gradient s·g_xa A is added
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
        grad_x, grads = kron_backward(factors, kron_operands(factors, x), grad_t, needs[3:], needs[0])
        if grad_x is not None and a is not None and grad_xa is not None:
            grad_x.addmm_(grad_xa, a, alpha=ctx.scale)
        grad_a = None
        if a is not None and needs[1] and grad_xa is not None:
            grad_a = torch.addmm(torch.empty(a.shape, dtype=a.dtype, device=a.device), grad_xa.T, x,
                                 beta=0, alpha=ctx.scale)
        return grad_x, grad_a, None, *grads


def folded_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  operands: list[torch.Tensor], row_factors: list[torch.Tensor]) -> torch.Tensor:
    """W0 T + s·B A from the operands of T's mode products on W0's rows (``kron_operands``)."""
    last = kron_modes(row_factors, weight.shape[0])[-1]
    return add_product(kron_mode(row_factors[-1], operands[-1], last).view(weight.shape), b, a.T, scale)


class FoldedKron(torch.autograd.Function):
    """y = x (W0 T + s·B A)ᵀ + b with T = F_1 ⊗ … ⊗ F_D, for a frozen W0 and b.

    T and the LoRA residual ride on the layer's own product, like LoRA's folded path: forward and the
    input gradient are one product of the layer's size each. T's mode products run on W0's rows
    (W0 T = (Tᵀ W0ᵀ)ᵀ: the transposed factors applied to each row), out rows instead of the tokens. The
    price is the weight's gradient G = gᵀ x (out x in, one more product of the layer's size): A and B
    get theirs from it as low-rank products, the factors theirs by the mode products' chain rule on the
    rows (``kron_backward`` with W0 as input and G as output gradient). Saves x, W0, A, B and the factors;
    the mode products on the rows are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, *factors):
        ctx.scale = scale
        ctx.save_for_backward(x, weight, a, b, *factors)
        row_factors = [f.T for f in factors]
        merged = folded_weight(weight, a, b, scale, kron_operands(row_factors, weight), row_factors)
        return nn.functional.linear(x, merged, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, a, b, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        row_factors = [f.T for f in factors]
        operands = kron_operands(row_factors, weight)
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if needs[0]:
            merged = folded_weight(weight, a, b, ctx.scale, operands, row_factors)
            grad_x = (flat_grad @ merged).view(x.shape)
        grad_weight = flat_grad.T @ flat_x
        grad_a = torch.mm(b.T, grad_weight) * ctx.scale if needs[3] else None
        grad_b = torch.mm(grad_weight, a.T) * ctx.scale if needs[4] else None
        _, grads = kron_backward(row_factors, operands, grad_weight, needs[6:], False)
        return grad_x, None, None, grad_a, grad_b, None, *[g.T if g is not None else None for g in grads]


def merge_modes(factors: list[torch.Tensor], groups: tuple[int, ...]) -> list[torch.Tensor]:
    """The Kronecker products of consecutive factors, ``groups[k]`` of them in the k-th: T is unchanged,
    (F_1 ⊗ F_2) ⊗ F_3 = F_1 ⊗ F_2 ⊗ F_3, but is applied in fewer, larger mode products. Built under
    autograd, so a merged factor's gradient reaches the cores through kron's backward (in²-sized at most)."""
    merged, start = [], 0
    for count in groups:
        block = factors[start]
        for factor in factors[start + 1:start + count]:
            block = torch.kron(block, factor)
        merged.append(block)
        start += count
    return merged


@dataclass(frozen=True)
class TransformPlan:
    """How the Kronecker transform runs: ``groups[k]`` consecutive modes merged into the k-th factor
    (``merge_modes``), applied to the activations (``KronLowRank``) or, ``folded``, to W0's rows (``FoldedKron``)."""

    groups: tuple[int, ...]
    folded: bool = False


@dataclass(frozen=True)
class CostModel:
    """A device's constants for ``plan_cost``, whose unit is one element of a mode product's operand read and
    one of its output written."""

    balance: float  # the reduction length K at which a GEMM's multiply-adds take as long as that traffic
    batched_penalty: float  # a batched GEMM of tiny matrices (any mode but the last) against that traffic
    launch: float  # one kernel's fixed cost


# cuda: an H100 in bf16, 2·790 TFLOP/s against 3 TB/s over 2-byte elements, a launch about 3 µs; the batched
# penalty is an estimate (the old mode-by-mode path, 11 such passes a projection, made the Llama-3.2-1B step
# 2.47x LoRA's) for ``tlora_probe.py --all-plans`` to confirm. cpu: fitted to that probe's plans on a 2-core x86
# host in fp32 at 1024 tokens (its batched GEMMs cost no more than a copy). Other devices take cuda's.
COST_MODELS = {"cuda": CostModel(balance=512, batched_penalty=4.0, launch=2**21),
               "cpu": CostModel(balance=48, batched_penalty=1.0, launch=2**14)}


def mode_product_costs(rows: int, sizes: tuple[int, ...], model: CostModel) -> list[tuple[float, float]]:
    """(apply, factor gradient) cost of each merged factor's mode product on rows x Π sizes; an input
    gradient costs an apply. The gradient of a mode but the last also writes its (batch, I, I) products."""
    width, costs = math.prod(sizes), []
    for d, size in enumerate(sizes):
        rest = math.prod(sizes[d + 1:])
        apply = rows * width * max(1.0, size / model.balance)
        penalty = model.batched_penalty if rest > 1 else 1.0
        batch_products = rows * width * size / rest if rest > 1 else 0.0
        costs.append((apply * penalty + model.launch, (apply + batch_products) * penalty + model.launch))
    return costs


def transform_cost(rows: int, sizes: tuple[int, ...], model: CostModel) -> float:
    """One training step's mode products: forward, the operands recomputed, factor and input gradients."""
    costs = mode_product_costs(rows, sizes, model)
    applies = [apply for apply, _ in costs]
    return 2 * sum(applies) + sum(applies[:-1]) + sum([gradient for _, gradient in costs])


def plan_cost(plan: TransformPlan, tokens: int, fan_out: int, shape: tuple[int, ...], model: CostModel) -> float:
    """The plan's step cost beyond the layer's own two products (forward, input gradient). Folded: the
    weight's gradient (tokens·in·out multiply-adds), the mode products on out rows and two passes over W0
    for W0 T + s·B A; else the mode products on the tokens and the LoRA residual's passes over them."""
    sizes = tuple([math.prod(part) for part in split_modes(shape, plan.groups)])
    fan_in = math.prod(shape)
    if plan.folded:
        weight_grad = tokens * fan_in * fan_out / model.balance
        return weight_grad + transform_cost(fan_out, sizes, model) + 2 * fan_out * fan_in
    return transform_cost(tokens, sizes, model) + 2 * tokens * (fan_in + fan_out)


def split_modes(shape: tuple[int, ...], groups: tuple[int, ...]) -> list[tuple[int, ...]]:
    starts = [sum(groups[:k]) for k in range(len(groups))]
    return [shape[start:start + count] for start, count in zip(starts, groups)]


def compositions(total: int) -> list[tuple[int, ...]]:
    """Every way to cut ``total`` modes into consecutive non-empty groups."""
    if total == 0:
        return [()]
    return [(first, *rest) for first in range(1, total + 1) for rest in compositions(total - first)]


def plan_transform(tokens: int, fan_out: int, shape: tuple[int, ...], can_fold: bool,
                   device_type: str = "cuda") -> TransformPlan:
    """The plan of least ``plan_cost`` for ``tokens`` rows on this kind of device: every grouping of the modes,
    on the activations or (where the layer allows) folded into the weight."""
    model = COST_MODELS.get(device_type, COST_MODELS["cuda"])
    best, best_cost = None, math.inf
    for groups in compositions(len(shape)):
        for folded in (False, True) if can_fold else (False,):
            cost = plan_cost(TransformPlan(groups, folded), tokens, fan_out, shape, model)
            if cost < best_cost:
                best, best_cost = TransformPlan(groups, folded), cost
    return best


# Eager calls plan once per token count; compiled code calls the plain function, since dynamo traces through a
# cache wrapper anyway (with a warning) and keeps the plan as a constant of the graph.
_cached_plan = functools.lru_cache(maxsize=1024)(plan_transform)


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


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the transform's GEMMs run in: x's, or that of an enclosing autocast region (never below fp64)."""
    amp = autocast_dtype(x.device.type)
    return x.dtype if amp is None or x.dtype == torch.float64 else amp


def in_gemm_dtype(fn, x2d: torch.Tensor, *args):
    """fn(x2d, *args) with x2d in ``gemm_dtype``: cast here, with autocast off inside, since autocast would not
    reach a custom function's backward."""
    amp = autocast_dtype(x2d.device.type)
    if amp is None or x2d.dtype == torch.float64:
        return fn(x2d, *args)
    with torch.autocast(x2d.device.type, enabled=False):
        return fn(x2d.to(amp), *args)


def cast_together(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The small fp32 factors in the activations' dtype with one cat and one cast (and one of each in
    backward) instead of a cast per tensor; as they are when the dtype already matches."""
    if all(t.dtype == dtype for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class TLoRAAdapter(LayerAdapter):
    plan_override: TransformPlan | None = None

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

    def is_kron(self) -> bool:
        return len(self.transform) > 0 and self.transform[0].shape[-1] == 1

    def transform_plan(self, x2d: torch.Tensor, can_fold: bool) -> TransformPlan:
        """``plan_override`` if set (tests and benchmarks/gpu/tlora_probe.py pin a path), else the cost model's."""
        if self.plan_override is not None:
            if self.plan_override.folded and not can_fold:
                raise ValueError("plan_override folds T into a layer that cannot take it")
            return self.plan_override
        shape = tuple(core.shape[0] for core in self.transform)
        planner = plan_transform if torch.compiler.is_compiling() else _cached_plan
        return planner(int(x2d.shape[0]), self.fan_out, shape, can_fold, x2d.device.type)

    def can_fold(self, layer: nn.Module, dtype: torch.dtype) -> bool:
        """Whether T and the LoRA residual may ride on the layer's product (``FoldedKron``): the adapter is
        alone on a plain layer (``folds_into``) whose weight and bias are frozen and in the GEMMs' dtype."""
        return self.residual_kind == "lora" and folds_into(layer) and frozen_in(layer, dtype)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.transform):
            return x
        if self.is_kron():
            x2d = x.reshape(-1, self.fan_in)
            t = in_gemm_dtype(self._fused_input, x2d, self.transform_plan(x2d, False))[0]
            return t.view(*x.shape[:-1], -1)
        return ring_apply([core.to(x.dtype) for core in self.transform], x)

    def _fused_input(self, x2d: torch.Tensor, plan: TransformPlan):
        """(T x, s·x Aᵀ, B) through ``KronLowRank`` on the plan's merged factors; (T x, None, None) for the TR
        residual."""
        merged = merge_modes(self.kron_factors(), plan.groups)
        if self.residual_kind != "lora":
            return KronLowRank.apply(x2d, None, 1.0, *cast_together(merged, x2d.dtype)), None, None
        *factors, a, b = cast_together([*merged, self.lora_A, self.lora_B], x2d.dtype)
        return *KronLowRank.apply(x2d, a, self.scale, *factors), b

    def _folded(self, x2d: torch.Tensor, layer: nn.Module, plan: TransformPlan) -> torch.Tensor:
        merged = merge_modes(self.kron_factors(), plan.groups)
        *factors, a, b = cast_together([*merged, self.lora_A, self.lora_B], x2d.dtype)
        return FoldedKron.apply(x2d, weight_matrix(layer), layer.bias, a, b, self.scale, *factors)

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
        if not self.is_kron():
            out = base(self.transform_input(x))
            a, b = cast_together([self.lora_A, self.lora_B * self.scale], x.dtype)
            return add_product(out, torch.mm(x2d, a.T), b)
        plan = self.transform_plan(x2d, self.can_fold(layer, gemm_dtype(x2d)))
        if plan.folded:
            return in_gemm_dtype(self._folded, x2d, layer, plan).view(*x.shape[:-1], -1)
        t, xa, b = in_gemm_dtype(self._fused_input, x2d, plan)
        return add_product(base(t.view(x.shape)), xa, b)  # the LoRA residual as one addmm

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
