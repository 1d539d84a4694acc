"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024, arXiv 2406.05223, NeurIPS 2024).

A few calibration samples orient the decomposition of each layer: with C the covariance of the
layer's inputs (in x in), the SVD is taken of W0·C, not of W0::

    C_d = C + λ·mean(diag C)·I          λ = 0.01, doubled until ‖C_d C_d⁻¹ - I‖_F < 0.05
    W0 C_d = U Σ Vᵀ                     V' = C_d⁻ᵀ V, so W0 = U Σ V'ᵀ
    B = U[:, idx] √(Σ_idx / s)          A = √(Σ_idx / s) V'[:, idx]ᵀ          s = alpha / r

* ``mode="ipm"`` (instruction-previewed; calibrate on the fine-tuning task; PEFT's default): idx = the
  first r components (largest Σ) train; the rest stay frozen.
* ``mode="kpm"`` (knowledge-preserved; calibrate on QA data such as NQ-open): idx = the last r
  components (smallest Σ) train, so the directions the knowledge uses stay frozen.

The reference replaces W0 by W_res = W0 - s·B0 A0 and trains a LoRA on top. peftlab keeps W0 and
subtracts the frozen initial factors in the forward::

    x ─► base (W0 x + b) ──────────────────────────────────────┐
    ├──► dropout ─► A ─► B ─► (· s) ───────────────────────────(+)
    └──► A0 ─► B0 ─► (· -s) ───────────────────────────────────(+) ─► y

    y = W0 x + b + s·B A dropout(x) - s·B0 A0 x       (= W_res x + b + s·B A dropout(x))

so the output equals the base at init (B = B0, A = A0) and ``disabled`` is the base exactly. Without
dropout both pairs see x and run as one rank-2r pair [B, -B0] [A; A0], folded into the layer's own
product where that pays (as LoRA's), so at init the output is the base up to that product's rounding. A0 and B0
depend on the calibration data, which is not seen again on load, so they are persistent buffers
(saved with the adapter, next to A and B). Loading onto other base weights only warns: the saved
tensors fully determine ΔW = s(B A - B0 A0).

Covariance (official ``calib_cov_distribution``): per calibration sample X (tokens x in, fp32),
X ← X / |max X| (the signed maximum, then its absolute value; not max |X|), C += XᵀX, and finally
C /= number of samples. The official hook assumes batch size 1 without padding; here each row of a
batch is one sample, padding tokens (mask False) are dropped before the maximum and the product,
and a sample without real tokens is skipped. A sample whose signed maximum is 0 is scaled by max |X|
instead (the official code would divide by zero).

Trainable parameters per adapted layer: r·(in + out) (A and B). 4096 x 4096, r = 128: 1,048,576.

Defaults (official github.com/iboing/CorDA, commit baffb03: ``cordalib/decomposition.py``,
``cordalib/act_aware_utils.py``, ``tools/train_CorDA.sh``; HF PEFT huggingface/peft 5d602fd
``src/peft/tuners/lora/corda.py`` and ``layer.py::corda_init``, same maths): r = 128, alpha = r (s = 1;
``alpha=None`` means alpha = r), dropout 0, targets all linear layers except the head (LLaMA: q, k, v,
o, gate, up, down), mode ipm. Training recipe: lr 2e-5, AdamW, no weight decay, cosine, warm-up 0.03,
batch 1 x 128 accumulation, 1 epoch of MetaMathQA train[:100000]; calibration 256 samples of 2048
tokens, seed 233 (ipm: MetaMathQA in the LLaMA-2 chat template; kpm: NQ-open questions).
Σ is divided by s before the square roots (PEFT), so s·B A reproduces the truncation for any alpha.

Deviations: W0 is not replaced by W_res (see above); batched and padded calibration (see above);
the bias is frozen (PEFT's bias="none"; the official code would also train an existing bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import add_product, linear, low_rank_update, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

MODES = ("ipm", "kpm")
DAMP_START = 0.01
DAMP_TOLERANCE = 0.05
DAMP_DOUBLINGS = 40  # 0.01·2^40 ≈ 1e10 times the mean variance: beyond that the covariance is unusable


class CovarianceStatistic:
    """Accumulates C = mean over samples of (X/|max X|)ᵀ(X/|max X|) for one layer, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.samples = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x``: (..., tokens, in), each leading index one sample; ``mask``: x.shape[:-1], True = real token."""
        x = x.detach().float()
        if x.dim() == 1:
            x = x[None]
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit inputs of shape {tuple(x.shape)}")
        samples = x.reshape(-1, *x.shape[-2:])
        keep = None if mask is None else mask.reshape(-1, x.shape[-2]).to(x.device).bool()
        for i, sample in enumerate(samples):
            if keep is not None:
                sample = sample[keep[i]]
            if sample.numel() == 0:
                continue
            if not torch.isfinite(sample).all():
                raise ValueError("corda: non-finite layer input during calibration")
            top = sample.max().abs()
            if top == 0:
                top = sample.abs().max()
            if top == 0:  # an all-zero sample adds nothing but still counts, as in the official hook
                self.samples += 1
                continue
            sample = sample / top
            self.sum.addmm_(sample.T, sample)
            self.samples += 1

    def covariance(self) -> torch.Tensor:
        if self.samples == 0:
            raise ConfigError("corda: no calibration sample reached this layer")
        return self.sum / self.samples


def damp_covariance(cov: torch.Tensor, start: float = DAMP_START, tolerance: float = DAMP_TOLERANCE):
    """(C_d, C_d⁻¹, λ): C + λ·mean(diag C)·I for the first λ in start·2^k with ‖C_d C_d⁻¹ - I‖_F < tolerance."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    mean = cov.diagonal().mean()
    if not torch.isfinite(mean) or mean <= 0:
        raise ConfigError("corda: the calibration covariance is zero or not finite")
    damp = start
    for _ in range(DAMP_DOUBLINGS):
        damped = cov + damp * mean * eye
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < tolerance:
            return damped, inverse, damp
        damp *= 2
    raise ConfigError("corda: the calibration covariance could not be inverted even after heavy damping")


def corda_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, mode: str, scale: float):
    """(A0, B0) of shapes (r, in), (out, r) with s·B0 A0 C_d = the chosen rank-r part of W0 C_d's SVD."""
    damped, inverse, _ = damp_covariance(cov)
    u, sigma, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    v_prime = vh @ inverse  # rows: V'ᵀ, so W0 = U Σ (vh C_d⁻¹)
    idx = slice(0, r) if mode == "ipm" else slice(sigma.numel() - r, sigma.numel())
    root = (sigma[idx] / scale).sqrt()
    a0 = root[:, None] * v_prime[idx]
    b0 = u[:, idx] * root[None, :]
    if not (torch.isfinite(a0).all() and torch.isfinite(b0).all()):
        raise ConfigError("corda: non-finite factors from the covariance-oriented SVD")
    return a0.contiguous(), b0.contiguous()


class CorDAAdapter(LayerAdapter):
    def __init__(self, config: CorDA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(r, fan_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r, device=site.device))
        # the frozen initial factors come from calibration data: saved with the adapter
        self.register_buffer("base_A", torch.zeros(r, fan_in, device=site.device), persistent=True)
        self.register_buffer("base_B", torch.zeros(fan_out, r, device=site.device), persistent=True)
        if site.restoring:
            return
        if site.statistic is None:
            raise ConfigError(f"{config.name}: no calibration statistic for {site.path}")
        cov = site.statistic.covariance().to(site.device)
        a0, b0 = corda_factors(site.weight(), cov, r, config.mode, self.scale)
        with torch.no_grad():
            for target, value in ((self.lora_A, a0), (self.lora_B, b0), (self.base_A, a0), (self.base_B, b0)):
                target.copy_(value)

    def forward(self, layer, x, base):
        """B A and -B0 A0 as one rank-2r pair where both see x (no dropout): folded into the layer's product
        where that pays (core.layers.low_rank_update), else one addmm; with dropout, one addmm each."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            out = add_product(base(x), linear(self.dropout(x), self.lora_A), self.lora_B, self.scale)
            return add_product(out, linear(x, self.base_A), self.base_B, -self.scale)
        a, b = self.stacked_factors()
        return low_rank_update(layer, x, base, a, b, self.scale, folded=folds_into(layer))

    def stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A; A0], [B, -B0]: s·(B A - B0 A0) as one rank-2r pair."""
        a = torch.cat([self.lora_A, self.base_A.to(self.lora_A.dtype)])
        b = torch.cat([self.lora_B, -self.base_B.to(self.lora_B.dtype)], dim=1)
        return a, b

    def delta_weight(self, layer) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float() - self.base_B.float() @ self.base_A.float())

    def residual(self, layer) -> torch.Tensor:
        """The reference's frozen W_res = W0 - s·B0 A0 (dense, for inspection and tests)."""
        return weight_matrix(layer).detach().float() - self.scale * self.base_B.float() @ self.base_A.float()

    def to_peft(self) -> dict[str, torch.Tensor]:
        """ΔW = s(B A - B0 A0) against the original W0 as a rank-2r LoRA pair [B, -B0], [A; A0]."""
        a, b = (factor.detach() for factor in self.stacked_factors())
        return {"lora_A.weight": a, "lora_B.weight": b}


@register
@dataclass
class CorDA(LayerMethod):
    name: ClassVar[str] = "corda"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "CorDA, arXiv 2406.05223"
    formula: ClassVar[str] = "r·(in + out)"
    mergeable: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    derives_from_weights: ClassVar[bool] = False  # nothing is recomputed from W0 on load (A0, B0 are saved)

    r: int = config_field(128, "rank of the trained part (r <= min(in, out))")
    alpha: float | None = config_field(None, "scale numerator: s = alpha / r (None: alpha = r, s = 1)")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    mode: str = config_field("ipm", "ipm: train the largest r components | kpm: train the smallest r")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0), self.name,
              f"alpha must be a positive number or None, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.mode in MODES, self.name, f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r

    def _check_rank(self, site: Site) -> None:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")

    def build(self, site: Site) -> LayerAdapter:
        self._check_rank(site)
        return CorDAAdapter(self, site)

    def new_statistic(self, site: Site) -> CovarianceStatistic:
        self._check_rank(site)  # before any calibration forward runs
        return CovarianceStatistic(site.in_features, site.device)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features)

    def to_peft(self) -> dict:
        alpha = self.r if self.alpha is None else self.alpha
        return {"r": 2 * self.r, "lora_alpha": 2 * alpha, "lora_dropout": self.dropout, "use_rslora": False,
                "use_dora": False}
