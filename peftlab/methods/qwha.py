"""qwha: QWHA, Quantization-Aware Walsh-Hadamard Adaptation (Jeon et al. 2025, arXiv 2509.17428).

The update is a sparse coefficient matrix F (out x N) expanded by one inverse Walsh–Hadamard transform
along the input dimension (the paper's ΔW = F H⁻¹; the code's ``iwht(dense_spectrum)``)::

    ΔW = c/N · F · H_N[:, :in]       H_N: Sylvester Hadamard (±1), N = in (next power of two, see below)
                                     c = scaling / √out,   F: n nonzeros (values = the trained spectrum)

The transform is fast: H_N = H_a ⊗ H_b (⊗ …) in Sylvester order, so x H_N is one small matmul per factor
(blocks of at most 128; N = 2048: 64 and 32), a pass over the tensor per block instead of log2 N
add/subtract passes. Two ways to apply ΔW (``forward``):

* ``"dense"`` rebuilds ΔW from F's rows every step (the official computation; out·N·(a + b) multiply-adds
  each way, whatever the batch). On a plain linear layer with this adapter alone on it, ΔW then rides on the layer's
  own product, y = (W + ΔW) x + b: a training step adds one product of the layer's size (ΔW's gradient,
  gᵀx) instead of the three of base(x) + ΔW x (forward, input gradient, ΔW's gradient)::

      F (out x N, n nonzeros) · c/N ──► WHT of the rows ──► [:, :in] ──► + W ──► (W + ΔW) x + b ──► y

* ``"activations"``: H is symmetric, so ΔW x = c/N · F (H_N pad(x)): transform the tokens and apply F
  (dense, out x N). Cheaper for a handful of tokens (generation), or for fewer tokens than outputs when
  ΔW cannot ride on W's product.

``"auto"`` (default) counts the multiply-adds of both, of forward and, when training, backward.

Initialisation ("AdaAlloc" + value refinement, ``init="adaalloc"``, the paper's and code's
``src/init/initialize.py``). The adapter fits a target ΔW* = W_ref − W_base in the calibrated norm
‖X(ΔW − ΔW*)ᵀ‖ with XᵀX from calibration data (+ 1e-4·mean diag damping):

1. transform the target: X* = H_N pad(ΔW*ᵀ) (the code's ``solve(bases, R ΔW*)``: identical when N = in,
   the minimum-norm solution when padded);
2. allocate the n coefficients to the output channels ∝ ‖X*[:, o]‖^p (p = ``alloc_power``, code's ALPHA
   = 1), at most ``in`` per channel;
3. per channel keep the k_o entries of largest ‖R h_j‖²·X*[j, o]² (R h_j: calibrated basis vector);
4. refine their values by least squares, min_w ‖R(H[:, sel] w − ΔW*[o]ᵀ)‖ (normal equations, as the code).

On a quantized base, W_base is the dequantized weight and W_ref the full-precision weight, so ΔW*
is the quantization error. **The quantized base belongs to a later issue**: here the base is full
precision and the reference is passed explicitly with ``reference=`` — a dict {module path: (out, in)
tensor} or a callable ``site -> tensor``. It is used once at init and not saved (everything it
determined, positions and values, is in the adapter's tensors). On a full-precision base without a
reference the target is zero and AdaAlloc is undefined: ``adapt`` raises a ConfigError; use
``init="random"`` (the code's un-initialised path, ``peft_init False``: positions from
``randperm(out·in)`` with seed 777, zero values) to fine-tune a full-precision model.

Trainable parameters per adapted layer: n = r·(in + out) (the code's ``match_lora_params``: as many
as LoRA of rank r; default r = 64, the code's ``--rank 64``). Llama-2-7B, all seven projections,
32 layers: 159,907,840 (= LoRA r = 64). Other defaults from the code: scaling 4000 (``--scale 4e3``
of the training scripts), damping 1e-4, alloc power 1, seed 777, all seven projections.
Positions are a persistent int32 buffer under AdaAlloc (data-dependent), a non-persistent one
regenerated from the seed under ``init="random"``.

Official code: github.com/vantaa89/qwha @ f5414a6 (``peft/src/peft/tuners/qhft/layer.py``,
``src/init/initialize.py``, ``src/init/hadamard.py``; the code calls the method QHFT).

Deviations and notes:

* Non-power-of-two input sizes: the code uses QuaRot's Hadamard matrices of order K·2^m (K = 12 … 172,
  e.g. 172·64 for Llama-2's 11008). peftlab zero-pads the input to the next power of two N and uses the
  first ``in`` rows of H_N (ΔW = c/N·F H_N[:, :in], F: out x N); identical when in is a power of two.
  On Llama-2-7B only down_proj (in = 11008 → N = 16384) is affected.
* The code's allocation can exceed the per-channel cap when it spreads the remainder; peftlab
  water-fills the remainder under the cap (same totals, same proportions otherwise).
* Least squares uses fp64 normal equations with the damped Gram; the selection uses XᵀX directly
  (‖R h‖² = hᵀXᵀXh for any root R, so the code's eigendecomposition is not needed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import add_product, apply_dense_delta, dense_delta_products
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

INITS = ("adaalloc", "random")
FORWARDS = ("auto", "activations", "dense")


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def hadamard_blocks(n: int, largest: int = 128) -> list[int]:
    """Sizes of the Sylvester factors H_n = H_a ⊗ H_b ⊗ …: as few as blocks of at most ``largest`` allow."""
    bits, most = n.bit_length() - 1, largest.bit_length() - 1
    parts = max(1, -(-bits // most))
    return [1 << (bits // parts + (i < bits % parts)) for i in range(parts)]


@functools.cache
def hadamard(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_size by Sylvester doubling (±1: exact in any float dtype), kept per dtype and device."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform over the last dim (length a power of two): x @ H_N.

    H_N[j, k] = (−1)^popcount(j & k) (Sylvester order, symmetric). H_N = H_a ⊗ H_b ⊗ …, so with the
    index split as (j_a, j_b, …) the transform is H_a along the first split axis, then H_b along the next:
    one small matmul each (N·(a + b + …) multiply-adds), not log2 N elementwise passes.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    y, rest = x.reshape(-1, n), n
    for size in hadamard_blocks(n):
        rest //= size
        block = hadamard(size, x.dtype, x.device)
        y = y.reshape(-1, size) @ block if rest == 1 else torch.matmul(block, y.reshape(-1, size, rest))
    return y.reshape(x.shape)


def hadamard_columns(rows: int, cols: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """H_N[:rows, cols] (rows x len(cols)), from the bit-parity formula; no N x N matrix."""
    bits = torch.arange(rows, device=cols.device)[:, None] & cols[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else nn.functional.pad(x, (0, size - x.shape[-1]))


def allocate(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer budgets ∝ ``weights`` summing to ``total``, each at most ``cap`` (floor, then water-fill)."""
    weights = weights.double().clamp_min(0)
    counts = torch.minimum((weights / weights.sum() * total).floor().long(), torch.full_like(weights, cap).long())
    while (left := total - int(counts.sum())) > 0:
        room = counts < cap
        share = left // int(room.sum())
        if share == 0:  # give the last few to the channels with the fewest, as the code does
            order = torch.argsort(counts.masked_fill(~room, cap + 1).double() + torch.arange(len(counts)) * 1e-9)
            counts[order[:left]] += 1
        else:
            counts[room] = torch.clamp(counts[room] + share, max=cap)
    return counts


def adaalloc(target: torch.Tensor, gram: torch.Tensor, n: int, size: int, power: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """QWHA's initialisation. ``target`` ΔW* (out, in), ``gram`` XᵀX (in, in, damped), fp64.

    Returns flat positions o·N + j (sorted) and w, the fitted ΔW coefficients: ΔWᵀ[:, o] ≈ Σ H[:in, j] w.
    """
    out, fan_in = target.shape
    spectrum = fwht(pad_last(target, size))  # X*ᵀ: row o = H_N pad(ΔW*[o]), (out, N)
    calibrated = fwht(pad_last(gram, size))  # XᵀX H_N[:in, :]  (in, N)
    norms = torch.empty(size, dtype=gram.dtype, device=gram.device)  # ‖R h_j‖² = h_jᵀ XᵀX h_j
    for start in range(0, size, 4096):
        cols = torch.arange(start, min(size, start + 4096), device=gram.device)
        norms[cols] = (hadamard_columns(fan_in, cols, gram.dtype) * calibrated[:, cols]).sum(0)
    budget = allocate(spectrum.norm(dim=1) ** power, n, fan_in)
    rhs_all = calibrated.T @ target.T  # H_Nᵀ XᵀX ΔW*ᵀ  (N, out)
    positions, values = [], []
    for o in range(out):
        k = int(budget[o])
        if k == 0:
            continue
        sel = torch.topk(norms * spectrum[o] ** 2, k).indices.sort().values
        basis = hadamard_columns(fan_in, sel, gram.dtype)  # (in, k)
        normal = basis.T @ calibrated[:, sel]  # H_selᵀ XᵀX H_sel
        rhs = rhs_all[sel, o]
        try:
            w = torch.linalg.solve(normal, rhs)
        except RuntimeError:  # singular (e.g. padded Hadamard columns that coincide on the first rows)
            w = torch.linalg.lstsq(normal, rhs[:, None]).solution[:, 0]
        positions.append(o * size + sel)
        values.append(w)
    return torch.cat(positions), torch.cat(values)


class GramStatistic:
    """Accumulates XᵀX (fp64) of a layer's inputs over the calibration batches."""

    def __init__(self, features: int):
        self.features = features
        self.gram: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = x.detach()
        if mask is not None:
            x = x[mask]
        x = x.reshape(-1, self.features).double()
        part = x.T @ x
        self.gram = part if self.gram is None else self.gram + part.to(self.gram.device)
        self.tokens += x.shape[0]


class QWHAAdapter(LayerAdapter):
    def __init__(self, config: QWHA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.fan_in, self.fan_out, self.size = fan_in, fan_out, next_power_of_two(fan_in)
        self.forward_mode = config.forward
        n = config.count(fan_in, fan_out)
        self.coef = config.scaling / math.sqrt(fan_out) / self.size  # ΔW = coef · F H_N[:, :in]
        self.spectrum = nn.Parameter(torch.zeros(n, device=site.device))
        index_dtype = torch.int32 if fan_out * self.size < 2**31 else torch.long
        learned = config.init == "adaalloc"
        self.register_buffer("positions", torch.zeros(n, dtype=index_dtype, device=site.device), persistent=learned)
        if not learned:  # deterministic from the seed: also right when restoring
            gen = torch.Generator().manual_seed(config.seed)
            chosen = torch.randperm(fan_out * self.size, generator=gen)[:n]
            self.positions.copy_(chosen.to(index_dtype))
            return
        if site.restoring:
            return
        target = config.reference_for(site) - site.weight()
        if not bool(target.any()):
            raise ConfigError(f"qwha: the init target W_ref − W_base is zero at {site.path}; "
                              "pass a reference that differs from the base (e.g. the weights it was quantized "
                              "from) or use init='random'")
        stat = site.statistic
        if stat is None or stat.gram is None:
            raise ConfigError(f"qwha: no calibration inputs reached {site.path}")
        gram = stat.gram.to(site.device)
        damping = config.damping * gram.diagonal().mean()
        gram = gram + torch.eye(fan_in, dtype=gram.dtype, device=gram.device) * damping
        positions, w = adaalloc(target.double().to(site.device), gram, n, self.size, config.alloc_power)
        with torch.no_grad():
            self.positions.copy_(positions.to(index_dtype))
            self.spectrum.copy_((w / self.coef).float())

    def spectrum_matrix(self, dtype, device) -> torch.Tensor:
        """F scaled by c/N, dense (out x N)."""
        flat = torch.zeros(self.fan_out * self.size, dtype=dtype, device=device)
        flat.index_put_((self.positions.long(),), (self.spectrum * self.coef).to(dtype))  # in place: no copy
        return flat.view(self.fan_out, self.size)

    def dense_delta(self, dtype, device) -> torch.Tensor:
        delta = fwht(self.spectrum_matrix(dtype, device))
        return delta if self.size == self.fan_in else delta[:, : self.fan_in]  # a slice's backward copies

    def use_dense(self, tokens: int, folded: bool) -> bool:
        """Whether rebuilding ΔW multiplies less than transforming the tokens, in forward and, when training,
        backward. Dense: a transform of F's out rows each way, plus ΔW's products of the layer's size (x,
        input gradient, ΔW's gradient; only the last when ``folded`` into W's own). Activations: a transform
        of the tokens each way, plus their products with F (out x N): forward, input and F gradients."""
        if self.forward_mode != "auto":
            return self.forward_mode == "dense"
        backward = int(torch.is_grad_enabled() and self.spectrum.requires_grad)
        per_row = self.size * sum(hadamard_blocks(self.size))  # one transform of a length-N row
        dense = ((1 + backward) * self.fan_out * per_row
                 + dense_delta_products(folded, backward) * tokens * self.fan_out * self.fan_in)
        activations = (1 + backward) * tokens * per_row + (1 + 2 * backward) * tokens * self.fan_out * self.size
        return dense < activations

    def forward(self, layer, x, base):
        folded = folds_into(layer)
        if self.use_dense(x.numel() // self.fan_in, folded):
            return apply_dense_delta(layer, x, base, self.dense_delta(x.dtype, x.device), folded=folded)
        transformed = fwht(pad_last(x, self.size))
        return add_product(base(x), transformed, self.spectrum_matrix(x.dtype, x.device))

    def delta_weight(self, layer) -> torch.Tensor:
        return self.dense_delta(torch.float32, self.spectrum.device)


@register
@dataclass
class QWHA(LayerMethod):
    name: ClassVar[str] = "qwha"
    family: ClassVar[str] = "transform-domain"
    paper: ClassVar[str] = "QWHA: Quantization-Aware Walsh-Hadamard Adaptation, arXiv 2509.17428"
    formula: ClassVar[str] = "r·(in + out) Walsh–Hadamard coefficients"
    mergeable: ClassVar[bool] = True

    r: int = config_field(64, "budget: n = r·(in + out) coefficients per layer (as many as LoRA rank r)")
    scaling: float = config_field(4000.0, "ΔW = scaling/√out · iWHT(F); values are stored divided by it")
    init: str = config_field("adaalloc", "adaalloc (fit W_ref − W_base; needs calibration and reference) | random")
    reference: Any = config_field(None, "init target: {path: W_ref (out, in)} or site -> W_ref (not saved)")
    seed: int = config_field(777, "seed of the random positions (init='random')")
    alloc_power: float = config_field(1.0, "channel budget ∝ ‖WHT of the target column‖^power")
    damping: float = config_field(1e-4, "XᵀX += damping·mean(diag)·I before the fit")
    forward: str = config_field("auto", "auto | activations (WHT of x, then F) | dense (rebuild ΔW = WHT of F; "
                                        "(W + ΔW) x on a plain layer alone)")

    @property
    def identity_at_init(self) -> bool:  # AdaAlloc starts at the fitted error correction
        return self.init == "random"

    @property
    def needs_calibration(self) -> bool:
        return self.init == "adaalloc"

    @property
    def derives_from_weights(self) -> bool:
        return self.init == "adaalloc"

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(self.scaling > 0, self.name, f"scaling must be positive, got {self.scaling}")
        check(self.init in INITS, self.name, f"init must be one of {INITS}, got {self.init!r}")
        check(self.reference is None or isinstance(self.reference, Mapping) or callable(self.reference), self.name,
              "reference must be None, a dict {module path: weight} or a callable site -> weight")
        check(isinstance(self.seed, int), self.name, f"seed must be an integer, got {self.seed!r}")
        check(self.alloc_power >= 0, self.name, f"alloc_power must be >= 0, got {self.alloc_power}")
        check(self.damping >= 0, self.name, f"damping must be >= 0, got {self.damping}")
        check(self.forward in FORWARDS, self.name, f"forward must be one of {FORWARDS}, got {self.forward!r}")

    def options(self) -> dict[str, Any]:
        options = super().options()
        options.pop("reference", None)  # an init-time input, not a hyperparameter of the trained adapter
        return options

    def count(self, in_features: int, out_features: int) -> int:
        return self.r * (in_features + out_features)

    def reference_for(self, site: Site) -> torch.Tensor:
        if self.reference is None:
            raise ConfigError("qwha: init='adaalloc' fits the quantization error W_ref − W_base: pass reference= "
                              "(dict {module path: full-precision weight} or callable site -> weight), or use "
                              "init='random' on a full-precision model")
        ref = self.reference.get(site.path) if isinstance(self.reference, Mapping) else self.reference(site)
        if ref is None:
            raise ConfigError(f"qwha: reference has no weight for {site.path}")
        ref = torch.as_tensor(ref).detach().float().to(site.device)
        if ref.shape != (site.out_features, site.in_features):
            raise ConfigError(f"qwha: reference for {site.path} has shape {list(ref.shape)}, expected "
                              f"[{site.out_features}, {site.in_features}] (out, in)")
        return ref

    def build(self, site: Site) -> LayerAdapter:
        fan_in, fan_out = site.features
        if self.count(fan_in, fan_out) > fan_in * fan_out:
            raise ConfigError(f"{self.name}: r={self.r} gives {self.count(fan_in, fan_out)} coefficients, more than "
                              f"in·out = {fan_in * fan_out} at {site.path}")
        return QWHAAdapter(self, site)

    def new_statistic(self, site: Site) -> GramStatistic:
        return GramStatistic(site.in_features)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.count(in_features, out_features)
