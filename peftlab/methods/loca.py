"""loca: LoCA, Location-aware Cosine Adaptation (Du et al., ICLR 2025, arXiv 2502.06820).

ΔW is the inverse 2-D DCT of a sparse spectrum: n learnable coefficients a at learnable locations l::

                 out x out          out x in             in x in
    ΔW = α · C_outᵀ · S(a, l) · C_in           S: zeros except S[l_k] = a_k, k = 1..n
                                               C_N: orthonormal DCT-II, C[f, j] = √(2/N) cos(π(2j+1)f / 2N)
    y = W0 x + b + ΔW x                        (row f = 0 scaled by 1/√2)

Because S has n entries, ΔW = α Σ_k a_k C_out[r_k]ᵀ C_in[c_k] is a sum of n rank-one cosine patterns,
and peftlab computes it as a rank-n product on the activations, never forming the out x in matrix::

    x ──► C_in[c] (n x in) ──► ⊙ α·a ──► C_out[r]ᵀ (out x n) ──► (+) ──► y        (+ base(x))

The gathered cosine rows are evaluated from the formula (angles reduced exactly in integers) and
kept until the locations move, so nothing of size out x out or in x in is stored (n·(in + out) values
in the activations' dtype are). The sum with the base output is fused into the last GEMM.
``forward="auto"`` switches to the dense ΔW (built as (C_out[r]ᵀ · α a) C_in[c]) when
tokens·n·(in+out) > n·in·out + tokens·in·out. Alone on a plain frozen layer, without dropout, "auto"
folds instead: ΔW is the rank-n product B A with A = C_in[c] and B = C_out[r]ᵀ·diag(α a), so the layer
runs as its one product (W + B A) x + b (core.layers.folded_low_rank). Building W + B A costs n·in·out
multiply-adds, in forward and again in backward; the factored form costs tokens·n·(in + out) in each,
so the fold pays from tokens > 2·in·out / (in + out), the fold's own threshold (``folds_low_rank``).
Backward then gets the coefficients' gradient through B's, gᵀ (x Aᵀ), and x's through the merged matrix.

Locations. Each location is kept, as in the official code, as a continuous pair l ∈ [0, 1]² (persistent
buffer ``locations``, so a trained adapter's locations save and load), used as
(round(clamp(l_r, 0, .999)·(out−1)), round(clamp(l_c, 0, .999)·(in−1))). Their gradient is the paper's
central finite difference of the loss across neighbouring frequencies, taken in the DCT domain of the
weight gradient G = ∂L/∂ΔW (K = C_out · α G · C_inᵀ)::

    ∂L/∂l_row ≈ clamp(½ a_k (K[r+1, c] − K[r−1, c]), −1, 1)      (indices clamped to the matrix)
    ∂L/∂l_col ≈ clamp(½ a_k (K[r, c+1] − K[r, c−1]), −1, 1)

times (dim − 1) for the rescaling (zero where l is outside [0, .999]), exactly the official
``IdctWithIndexGrad.backward``. peftlab evaluates the needed K entries from the activations and output
gradients (Σ_t (C_out[r±1]·g_t)(C_in[c]·x_t), no out x in matrix) in a backward hook, summed over
micro-batches, and steps the locations with Adam (β 0.9/0.999, ε 1e-8, lr ``location_lr`` times the
trainer's lr / peak lr, i.e. the same warm-up and decay as the official separate param group).

Alternating schedule (official layer.py; paper: B_a = 10, B_l = 20, B_s ≈ 10% of training): for the
optimizer steps t < B_s, steps with t mod 30 < 10 train the coefficients and the others the locations
(coefficients frozen); from B_s on, locations are frozen and only the coefficients train. Driven by
the training hooks: ``on_step`` picks the phase, ``before_optimizer_step`` applies the location update
and drops the coefficients' gradient in location phases (the official code sets requires_grad False).
Without a trainer that calls the hooks, LoCA trains the coefficients at its random initial locations.

Trainable parameters per adapted layer: n (the coefficients; the 2n locations are buffers updated by
the rule above, as the paper counts them). Defaults: n = 1000 (the paper matches FourierFT's budget;
the third-party harness that vendors the code records n_frequency 1000, scale 1, location lr 1e-4,
warm-up ratio .06 for RoBERTa GLUE), α = 1, B_a/B_l/B_s = 10/20/10% (paper), dropout 0. Llama-2-7B,
32 layers: 64,000 on q and v (the FourierFT-matched setting), 224,000 on all seven projections.

Official code: github.com/TL-UESTC/LoCA (``peft/src/peft/tuners/loca/{layer,dct_utils}.py``). That
repository could not be retrieved here; peftlab follows a verbatim vendored copy of those two files found
in the code index (a third party's ``loca_adapter.py`` / ``loca_dct_utils.py``, commit unknown).

Deviations and notes:

* The code builds the dense ΔW every step (``dct_mode="default"``: C_Mᵀ S C_N with cached dense DCT
  matrices). peftlab computes the same function factored (or dense when cheaper), as above.
* The code counts its schedule in forward calls (micro-batches, training mode only); peftlab counts
  optimizer steps (equal without gradient accumulation). B_s is ``location_steps`` or
  round(``location_fraction``·total steps).
* The code has the locations as an nn.Parameter in the user's optimizer; here they are a buffer with
  their own Adam (no weight decay; moment estimates are not saved, so resuming mid-schedule restarts
  them). In location phases the coefficients still get a gradient (dropped before the step), so a
  trainer's gradient clipping sees it; the official code computes none.
* Duplicate locations add up (as the code's sparse-to-dense does); stored locations are not clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import folded_low_rank, folds_low_rank
from peftlab.core.method import LayerAdapter, LayerMethod, Site, TrainingStep, check, check_positive_ints, config_field
from peftlab.core.registry import register

FORWARDS = ("auto", "factored", "dense")
BETAS, EPS = (0.9, 0.999), 1e-8


def dct_rows(freqs: torch.Tensor, size: int, dtype: torch.dtype = torch.float32,
             device: torch.device | None = None) -> torch.Tensor:
    """Rows ``freqs`` of the orthonormal DCT-II matrix of order ``size`` (len(freqs) x size).

    C[f, j] = √(2/N)·cos(π(2j+1)f / 2N), row f = 0 scaled by 1/√2. The angle (2j+1)f is reduced modulo
    4N in integers first, so the cosine is accurate in float32 at any N.
    """
    device = freqs.device if device is None else device
    freqs = freqs.to(device=device, dtype=torch.long)
    j = torch.arange(size, device=device)
    phase = (freqs[:, None] * (2 * j + 1)[None, :]) % (4 * size)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rows = torch.cos(phase.to(work) * (math.pi / (2 * size))) * math.sqrt(2.0 / size)
    rows = torch.where(freqs[:, None] == 0, rows / math.sqrt(2.0), rows)
    return rows.to(dtype)


def dct_matrix(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The full orthonormal DCT-II matrix (rows are frequencies): for references and tests."""
    return dct_rows(torch.arange(size), size, dtype)


class LoCAAdapter(LayerAdapter):
    def __init__(self, config: LoCA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        self.fan_in, self.fan_out = fan_in, fan_out
        self.scale = config.scale
        self.forward_mode = config.forward
        self.location_lr = config.location_lr
        self.schedule = (config.coefficient_phase, config.location_phase)
        self.location_fraction, self.location_steps = config.location_fraction, config.location_steps
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        n = config.n_frequency
        self.spectrum = nn.Parameter(torch.zeros(n, device=site.device))
        self.register_buffer("locations", torch.zeros(2, n, device=site.device))  # persistent: they move
        self.register_buffer("location_grad", torch.zeros(2, n, device=site.device), persistent=False)
        self.register_buffer("adam_m", torch.zeros(2, n, device=site.device), persistent=False)
        self.register_buffer("adam_v", torch.zeros(2, n, device=site.device), persistent=False)
        self.adam_steps = 0
        self.phase = "coefficients"
        if site.restoring:
            return
        with torch.no_grad():
            self.locations.uniform_(0, 1)  # the official init (nn.init.uniform_)

    # -- locations ------------------------------------------------------------------------------------

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the coefficients: the code's round(clamp(l, 0, .999)·(dim − 1))."""
        clipped = self.locations.clamp(0, 0.999)
        rows = (clipped[0] * (self.fan_out - 1)).round().long()
        cols = (clipped[1] * (self.fan_in - 1)).round().long()
        return rows, cols

    @property
    def learning_locations(self) -> bool:
        return self.phase == "locations"

    def phase_at(self, step: TrainingStep) -> str:
        """The official alternating schedule, counted in optimizer steps."""
        until = self.location_steps
        if until is None:
            until = round(self.location_fraction * step.total_steps)
        coefficient_steps, location_steps = self.schedule
        t = step.step
        if t == 0 or t >= until:
            return "coefficients"
        return "coefficients" if t % (coefficient_steps + location_steps) < coefficient_steps else "locations"

    def on_step(self, step: TrainingStep) -> None:
        self.phase = self.phase_at(step)
        self.location_grad.zero_()

    @torch.no_grad()
    def accumulate_location_grad(self, grad_out: torch.Tensor, x: torch.Tensor, coef: torch.Tensor,
                                 rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Add the finite-difference location gradient of one backward pass to ``location_grad``."""
        g = grad_out.reshape(-1, self.fan_out).float()
        x = x.reshape(-1, self.fan_in).float()
        out, fan_in = self.fan_out, self.fan_in

        def k_entries(r, c):  # K[r_k, c_k] = α Σ_t (C_out[r_k]·g_t)(C_in[c_k]·x_t), one per coefficient
            return self.scale * ((g @ dct_rows(r, out).T) * (x @ dct_rows(c, fan_in).T)).sum(0)

        up, down = (rows + 1).clamp(max=out - 1), (rows - 1).clamp(min=0)
        right, left = (cols + 1).clamp(max=fan_in - 1), (cols - 1).clamp(min=0)
        grad_row = (0.5 * coef * (k_entries(up, cols) - k_entries(down, cols))).clamp(-1, 1)
        grad_col = (0.5 * coef * (k_entries(rows, right) - k_entries(rows, left))).clamp(-1, 1)
        inside = ((self.locations >= 0) & (self.locations <= 0.999)).float()  # clamp's gradient
        dims = torch.tensor([[out - 1.0], [fan_in - 1.0]], device=inside.device)
        self.location_grad += torch.stack([grad_row, grad_col]) * dims * inside

    @torch.no_grad()
    def before_optimizer_step(self, step: TrainingStep) -> None:
        if not self.learning_locations:
            return
        self.spectrum.grad = None  # coefficients stay put in location phases
        lr = self.location_lr * (step.lr / step.peak_lr if step.peak_lr else 1.0)
        self.adam_steps += 1
        (b1, b2), t = BETAS, self.adam_steps
        grad = self.location_grad
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.adam_v / (1 - b2**t)).sqrt_().add_(EPS)
        self.locations.addcdiv_(self.adam_m, denom, value=-lr / (1 - b1**t))
        grad.zero_()

    # -- forward --------------------------------------------------------------------------------------

    def bases(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols = self.indices()
        return dct_rows(cols, self.fan_in, dtype, device), dct_rows(rows, self.fan_out, dtype, device), rows, cols

    def use_dense(self, tokens: int) -> bool:
        if self.forward_mode != "auto":
            return self.forward_mode == "dense"
        n, fan_in, out = self.spectrum.numel(), self.fan_in, self.fan_out
        return tokens * n * (fan_in + out) > n * fan_in * out + tokens * fan_in * out

    def cached_bases(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``bases`` kept until the locations change (they move only in location phases): the cosine rows
        cost n·(in + out) elementwise work per call otherwise. Holds n·(in + out) values in ``dtype``."""
        if torch.compiler.is_compiling():
            return self.bases(dtype, device)
        loc = self.locations
        key = (dtype, torch.device(device), id(loc), loc.data_ptr(), loc._version)
        cache = self.__dict__.get("_bases_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.bases(dtype, device))
            self.__dict__["_bases_cache"] = cache
        return cache[1]

    def folds(self, layer, x) -> bool:
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        return self.forward_mode == "auto" and not dropping and folds_into(layer) and folds_low_rank(layer, x)

    def forward(self, layer, x, base):
        """(W + ΔW) x + b as the layer's one product when it folds (see the module's docstring), else
        base(x) + ΔW x with the sum fused into the last GEMM (addmm)."""
        h = self.dropout(x)
        a_rows, b_rows, rows, cols = self.cached_bases(h.dtype, h.device)
        coef = (self.spectrum * self.scale).to(h.dtype)
        if self.folds(layer, x):
            y = folded_low_rank(layer, x, a_rows, b_rows.T * coef, 1.0)
        else:
            result = base(x)
            flat = h.reshape(-1, self.fan_in)
            out = result.reshape(flat.shape[0], self.fan_out)
            if self.use_dense(flat.shape[0]):
                y = torch.addmm(out, flat, ((b_rows.T * coef) @ a_rows).T)
            else:
                y = torch.addmm(out, nn.functional.linear(flat, a_rows) * coef, b_rows)
            y = y.view(result.shape)
        if self.training and self.learning_locations and y.requires_grad:  # ∂L/∂y is ∂L/∂(ΔW x)
            saved_x, saved_coef = h.detach(), self.spectrum.detach().clone()
            y.register_hook(lambda g: self.accumulate_location_grad(g, saved_x, saved_coef, rows, cols))
        return y

    def delta_weight(self, layer) -> torch.Tensor:
        a_rows, b_rows, _, _ = self.bases(torch.float32, self.spectrum.device)
        return (b_rows.T * (self.spectrum.float() * self.scale)) @ a_rows


@register
@dataclass
class LoCA(LayerMethod):
    name: ClassVar[str] = "loca"
    family: ClassVar[str] = "transform-domain"
    paper: ClassVar[str] = "LoCA: Location-Aware Cosine Adaptation, arXiv 2502.06820"
    formula: ClassVar[str] = "n_frequency (coefficients; the 2·n locations are buffers)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True

    n_frequency: int = config_field(1000, "n: learnable DCT coefficients per layer")
    scale: float = config_field(1.0, "α: ΔW = α · iDCT2(S)")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    location_lr: float = config_field(1e-4, "Adam learning rate of the locations (in [0, 1] units)")
    location_fraction: float = config_field(0.1, "B_s as a fraction of the total steps (locations frozen after)")
    location_steps: int | None = config_field(None, "B_s in optimizer steps (overrides location_fraction)")
    coefficient_phase: int = config_field(10, "B_a: steps per cycle that train the coefficients")
    location_phase: int = config_field(20, "B_l: steps per cycle that train the locations")
    forward: str = config_field("auto", "auto (fold into the layer's product where it pays, else the cheaper of the "
                                        "two others) | factored (rank-n on activations) | dense (build ΔW)")

    def validate(self) -> None:
        check_positive_ints(self, "n_frequency")
        check(self.scale > 0, self.name, f"scale must be positive, got {self.scale}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.location_lr >= 0, self.name, f"location_lr must be >= 0, got {self.location_lr}")
        check(0.0 <= self.location_fraction <= 1.0, self.name,
              f"location_fraction must be in [0, 1], got {self.location_fraction}")
        check(self.location_steps is None or (isinstance(self.location_steps, int) and self.location_steps >= 0),
              self.name, f"location_steps must be None or a non-negative integer, got {self.location_steps!r}")
        check_positive_ints(self, "coefficient_phase")
        check(isinstance(self.location_phase, int) and self.location_phase >= 0, self.name,
              f"location_phase must be a non-negative integer, got {self.location_phase!r}")
        check(self.forward in FORWARDS, self.name, f"forward must be one of {FORWARDS}, got {self.forward!r}")

    def build(self, site: Site) -> LayerAdapter:
        fan_in, fan_out = site.features
        if self.n_frequency > fan_in * fan_out:
            raise ConfigError(f"{self.name}: n_frequency={self.n_frequency} exceeds in·out = {fan_in * fan_out} "
                              f"at {site.path}")
        return LoCAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.n_frequency
