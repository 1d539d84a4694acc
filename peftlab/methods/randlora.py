"""randlora: RandLoRA, full-rank updates from learned scalings of fixed random low-rank bases.

Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025,
arXiv 2502.00987. With m = min(in, out), M = max(in, out), n = ⌈m / r⌉ bases of rank r::

    ΔW (M x m side) = s · Σ_{b=1..n} B_b diag(λ_b) A diag(γ_b)          s = alpha / r
                      B_b: M x r random (frozen), A: r x m random (frozen, shared by all b)
                      λ_b ∈ R^r, γ_b ∈ R^m: trained

n·r ≥ m makes the sum full rank. The learned diagonals act on the small side: for a layer with
in ≤ out, ΔW = B_flat · Â (out x in) with Â = λ ⊙ A ⊙ γ stacked to (r·n) x in; for out < in,
ΔW = Âᵀ B_flatᵀ. Two ways to apply it (``forward``):

* ``"factored"``: the two products on the activations, the second one summed into base(x) (addmm)::

      x ──► Â (r·n x m) ──► B_flat (M x r·n) ──► (+ base(x)) ──► y

  r·n ≥ m, so the factors are not thin: tokens·r·n·(M + m) multiply-adds, as much as 1.25 to 2 products
  of the layer's size in forward and 1.5 to 3 in backward.
* ``"dense"``: build ΔW = B_flat Â (M·m·r·n multiply-adds each way, whatever the batch). On a plain linear
  layer with this adapter alone on it (and no dropout), ΔW then rides on the layer's own product,
  y = (W + ΔW) x + b: a training step adds one product of the layer's size (ΔW's gradient, gᵀx) instead of
  three for base(x) + ΔW x.

``"auto"`` (default) counts the multiply-adds of both, of forward and, when training, backward: a folded
training step takes the dense path from about m/2 tokens on (square layers; 8m/7 when M = 4m). λ starts
at zero (identity at init), γ at 1/max(n, m).

Bases. Exactly HF PEFT's ``RandLoraModel._init_randlora_A_randlora_B`` (peft 0.21.2, written by the
paper's first author): from ``torch.Generator().manual_seed(seed)``, A = kaiming_uniform(a=√5) of
shape (r, 1, m_b) in bfloat16, then n_b chunks (M_b, 1, r) for B, each divided by its std; ``basis=
"sparse"`` / ``"very_sparse"`` are PEFT's ternary bases (P(±1) = 1/6 resp. 1/(2√m_b)). PEFT generates
one pair for the whole model, sized (M_b, m_b) = (max, min) of (largest out, largest in) over the
targets, and every layer slices A[:, :, :m], B[:M, :n]; peftlab builds each layer without seeing the
others, so by default a pair is sized from the layer's own shape and shared by all layers of that
shape; ``basis_dims=(M_b, m_b)`` (``peft_basis_dims(model, targets)`` computes PEFT's) reproduces
PEFT's bases on layers of mixed shapes. The bases are regenerated from ``seed`` on load (not saved):
the generator runs on the CPU in a fixed dtype, so they do not depend on the device (PEFT picks
bf16 or fp16 by the machine and defaults to saving them). They live in one non-persistent buffer module
per (shape, dtype, device) shared by the adapters of one adapt call; do not reuse one config object
for models on different devices and then move one of them.

Trainable parameters per adapted layer: n·(r + m), n = ⌈min(in, out) / r⌉. Defaults from PEFT's
RandLoraConfig: r = 32, alpha = 640 (20·r), dropout 0, seed (projection_prng_key) 0, dense bases.
Llama-2-7B, r = 32, every one of q k v o gate up down (m = 4096 everywhere, n = 128): 528,384 per
layer, 118,358,016 for 32 layers; q k v up down (the official LLM scripts' targets): 84,541,440.

Official code: github.com/PaulAlbert31/RandLoRA @ 4ac565e (``peft/src/peft/tuners/randlora``); parity
target: HF PEFT 0.21.2 ``peft/tuners/randlora`` (tests/methods/test_randlora.py checks equal outputs).

Deviations and notes:

* PEFT and the official code differ in the scale: the official layer uses s = alpha / r / √n (its
  scripts pass alpha = 2r), PEFT uses s = alpha / r. peftlab follows PEFT (the required parity);
  ``scale_by_bases=True`` divides by √n as the official code does.
* PEFT pairs the flattened bases and scalings in its own interleaved order (Â row k·n + b against B
  column b·r + k); peftlab keeps that order so that equal bases give equal outputs.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import add_product, apply_factored_delta, dense_delta_products, features, is_linear, linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

BASES = ("dense", "sparse", "very_sparse")
FORWARDS = ("auto", "factored", "dense")


def num_bases(min_dim: int, r: int) -> int:
    return math.ceil(min_dim / r)


def random_bases(seed: int, r: int, max_dim: int, min_dim: int,
                 kind: str = "dense") -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared bases: A (r, 1, min_dim) and B (max_dim, n, r), fp32 (values as PEFT computes them)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = num_bases(min_dim, r)
    if kind == "dense":
        def kaiming(shape):
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=gen)

        a = kaiming((r, 1, min_dim))
        b = torch.cat([kaiming((max_dim, 1, r)) for _ in range(n)], dim=1)
    else:
        sparsity = 3 if kind == "sparse" else math.sqrt(min_dim)
        uniform_a = torch.rand((r, 1, min_dim), generator=gen)
        uniform_b = torch.rand((max_dim, n, r), generator=gen)

        def ternary(u):
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * sparsity)] = -1
            t[u > 1 - 1 / (2 * sparsity)] = 1
            return t

        a, b = ternary(uniform_a), ternary(uniform_b)
    with torch.no_grad():
        a, b = a / a.std(), b / b.std()  # in the generation dtype, as PEFT
    return a.float(), b.float()


class SharedBases(nn.Module):
    """The frozen random pair, one module shared by the adapters that use it (non-persistent buffers)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)


class ScaledBasis(torch.autograd.Function):
    """λ[:, :, None] · A · γ[None] (r, n, m) without keeping the product for backward (PEFT's UniqueBaseGrad).

    Backward's two contractions are written as products and sums, which the compiler fuses into one pass over the
    gradient each. As einsums they lowered to batched products of one row and copies: on an H100's compiled 1B
    step, 1.3 ms of bmm, 0.8 ms of permuted inputs and 0.6 ms copying λ's transposed gradient to its layout."""

    @staticmethod
    def forward(ctx, a, lam, gamma):
        ctx.save_for_backward(a, lam, gamma)
        return lam[:, :, None] * a * gamma[None]

    @staticmethod
    def backward(ctx, grad):
        a, lam, gamma = ctx.saved_tensors
        a, lam, gamma = a.to(grad.dtype), lam.to(grad.dtype), gamma.to(grad.dtype)
        along_basis = grad * a
        return None, (along_basis * gamma).sum(-1), (along_basis * lam[:, :, None]).sum(0)


class RandLoRAAdapter(LayerAdapter):
    def __init__(self, config: RandLoRA, site: Site, bases: SharedBases):
        super().__init__()
        fan_in, fan_out = site.features
        self.fan_in, self.fan_out = fan_in, fan_out
        self.min_dim, self.max_dim = min(fan_in, fan_out), max(fan_in, fan_out)
        self.n = num_bases(self.min_dim, config.r)
        self.k = self.n * config.r  # rows of Â
        self.scale = config.alpha / config.r / (math.sqrt(self.n) if config.scale_by_bases else 1.0)
        self.forward_mode = config.forward
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bases = bases
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.n, device=site.device))
        gamma = torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim), device=site.device)
        self.randlora_gamma = nn.Parameter(gamma)

    def factors(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â: r·n x m, B_flat: M x n·r), in ``dtype``; Â carries the trained scalings."""
        a = self.bases.a[:, :, : self.min_dim].to(dtype)
        b = self.bases.b[: self.max_dim, : self.n, :].to(dtype).flatten(start_dim=1)
        scaled = ScaledBasis.apply(a, self.randlora_lambda.to(dtype), self.randlora_gamma.to(dtype))
        return scaled.flatten(end_dim=1), b

    def use_dense(self, tokens: int, folded: bool) -> bool:
        """Whether building ΔW multiplies less than the factored path, in forward and, when training, backward.
        Dense: B_flat Â each way, plus ΔW's products of the layer's size (x, input gradient, ΔW's gradient; only
        the last when ``folded`` into W's own). Factored: x through Â and B_flat, back through both, and Â's
        gradient (r·n x m)."""
        if self.forward_mode != "auto":
            return self.forward_mode == "dense"
        backward = int(torch.is_grad_enabled() and self.randlora_lambda.requires_grad)
        big, small = self.max_dim, self.min_dim
        dense = (1 + backward) * big * small * self.k + dense_delta_products(folded, backward) * tokens * big * small
        factored = tokens * self.k * ((1 + backward) * (big + small) + backward * small)
        return dense < factored

    def delta_factors(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with ΔW = left · right (out x in), without s."""
        scaled, b = self.factors(dtype)
        return (b, scaled) if self.min_dim == self.fan_in else (scaled.T, b.T)

    def dense_delta(self, dtype) -> torch.Tensor:
        """ΔW without s."""
        left, right = self.delta_factors(dtype)
        return left @ right

    def forward(self, layer, x, base):
        dropped = self.training and isinstance(self.dropout, nn.Dropout)  # then ΔW sees another input than W
        folded = not dropped and folds_into(layer)
        h = self.dropout(x)
        if self.use_dense(h.numel() // self.fan_in, folded):
            return apply_factored_delta(layer, x, base, *self.delta_factors(h.dtype), folded=folded, scale=self.scale,
                                        adapter_input=h)
        scaled, b = self.factors(h.dtype)
        if self.min_dim == self.fan_in:  # s (x Âᵀ) B_flatᵀ
            return add_product(base(x), linear(h, scaled), b, self.scale)
        return add_product(base(x), h @ b, scaled.T, self.scale)  # s (x B_flat) Â

    def delta_weight(self, layer) -> torch.Tensor:
        return self.dense_delta(torch.float32) * self.scale


@register
@dataclass
class RandLoRA(LayerMethod):
    name: ClassVar[str] = "randlora"
    family: ClassVar[str] = "transform-domain"
    paper: ClassVar[str] = "RandLoRA: Full-rank parameter-efficient fine-tuning of large models, arXiv 2502.00987"
    formula: ClassVar[str] = "n·(r + min(in, out)),  n = ⌈min(in, out) / r⌉"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True

    r: int = config_field(32, "rank of each random basis (more bases, fewer parameters as r grows)")
    alpha: float = config_field(640.0, "s = alpha / r (PEFT: typically 20·r)")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    seed: int = config_field(0, "seed of the random bases (PEFT's projection_prng_key), regenerated on load")
    basis: str = config_field("dense", "dense (Kaiming, bf16) | sparse | very_sparse (PEFT's ternary bases)")
    basis_dims: tuple[int, int] | None = config_field(None, "(max, min) size of the shared bases; None: per layer "
                                                            "shape; PEFT's global size reproduces PEFT exactly")
    scale_by_bases: bool = config_field(False, "official code's s = alpha / r / √n (PEFT: alpha / r)")
    forward: str = config_field("auto", "auto | factored (two products on x) | dense (build ΔW; (W + ΔW) x on a "
                                        "plain layer alone)")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")
        check(self.basis in BASES, self.name, f"basis must be one of {BASES}, got {self.basis!r}")
        dims = self.basis_dims
        shaped = dims is None or (len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims)
                                  and dims[0] >= dims[1])
        check(shaped, self.name,
              f"basis_dims must be None or (max, min) positive integers with max >= min, got {dims!r}")
        check(self.forward in FORWARDS, self.name, f"forward must be one of {FORWARDS}, got {self.forward!r}")

    def shared_bases(self, max_dim: int, min_dim: int, dtype: torch.dtype, device: torch.device) -> SharedBases:
        cache = self.__dict__.setdefault("_bases", weakref.WeakValueDictionary())
        key = (self.seed, self.r, self.basis, max_dim, min_dim, dtype, str(device))
        bases = cache.get(key)
        if bases is None:
            a, b = random_bases(self.seed, self.r, max_dim, min_dim, self.basis)
            bases = SharedBases(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            cache[key] = bases
        return bases

    def build(self, site: Site) -> LayerAdapter:
        fan_in, fan_out = site.features
        max_dim, min_dim = max(fan_in, fan_out), min(fan_in, fan_out)
        if self.basis_dims is not None:
            if self.basis_dims[0] < max_dim or self.basis_dims[1] < min_dim:
                raise ConfigError(f"{self.name}: basis_dims={self.basis_dims} is smaller than {site.path} "
                                  f"(needs max >= {max_dim}, min >= {min_dim})")
            max_dim, min_dim = self.basis_dims
        dtype = site.dtype if site.dtype.is_floating_point else torch.float32
        return RandLoRAAdapter(self, site, self.shared_bases(max_dim, min_dim, dtype, site.device))

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        m = min(in_features, out_features)
        return num_bases(m, self.r) * (self.r + m)


def peft_basis_dims(model: nn.Module, paths: list[str]) -> tuple[int, int]:
    """PEFT's shared-basis size for the given target paths: (max, min) of (largest out, largest in)."""
    outs, ins = zip(*[features(model.get_submodule(p))[::-1] for p in paths if is_linear(model.get_submodule(p))])
    return max(max(outs), max(ins)), min(max(outs), max(ins))
