"""LoRA and DoRA.

LoRA (Hu et al. 2021, arXiv 2106.09685)::

    x ──► W0 ───────────────┐
    │                       ▼
    └─► dropout ─► A ─► B ─► (+ s·)──► y        A: r x in, B: out x r, s = alpha / r

y = W0 x + b + s · B A dropout(x). A starts Kaiming-uniform (a = √5) and B at zero, so the model is
unchanged at init. ``init="gaussian"`` draws A ~ N(0, 1/r) instead (HF PEFT's option), and
``init="pissa"`` starts A, B at the top-r singular triplets of W0 (PiSSA, arXiv 2404.02948): the
principal part s·B0 A0 is then subtracted as a frozen low-rank term, so W0 itself is never
modified and the output still equals the base at init. ``rslora`` uses s = alpha / √r (Kalajdzievski
2023). Defaults follow LLM-Adapters: r 8, alpha 16, dropout 0.05 (its math runs: r 32, alpha 64 on
q, k, v, up, down); unlike LLM-Adapters (q, v) the default targets are all seven projections.

DoRA (Liu et al. 2024, arXiv 2402.09353) splits the updated weight into a magnitude vector and a
normalised direction::

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row          m starts at ‖W0‖_row (one value per output)

with the norm treated as a constant in backward (the paper's memory-saving choice, as in PEFT).
The row norms are computed without forming the out x in matrix:
‖W0 + sBA‖² = ‖W0‖² + 2s·Σ_k B_ik (W0 Aᵀ)_ik + s²·Σ_kl B_ik (AAᵀ)_kl B_il.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.inject import folds_into
from peftlab.core.layers import folded_low_rank, folds_low_rank, linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register

INITS = ("zeros", "gaussian", "pissa")


class LoRAAdapter(LayerAdapter):
    def __init__(self, config: LoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(r, fan_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r, device=site.device))
        self.principal = config.init == "pissa"
        if self.principal:
            a0, b0 = _principal_factors(site.weight(), r, self.scale)
            self.register_buffer("base_A", a0, persistent=False)
            self.register_buffer("base_B", b0, persistent=False)
        if site.restoring:
            return
        with torch.no_grad():
            if self.principal:
                self.lora_A.copy_(a0)
                self.lora_B.copy_(b0)
            elif config.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, layer, x, base):
        """base(x) + s·B A dropout(x). Alone on a plain layer, without dropout and for enough tokens, as one
        product (W + s·B A) x + b (core.layers.folded_low_rank); otherwise the scale rides on B's cast and
        the sum on the B-GEMM (addmm), so no extra pass over the output is made in forward or backward."""
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if not (dropping or self.principal) and folds_into(layer) and folds_low_rank(layer, x):
            return folded_low_rank(layer, x, self.lora_A, self.lora_B, self.scale)
        out = base(x)
        flat = out.reshape(-1, out.shape[-1])
        flat = _add_low_rank(flat, self.dropout(x), self.lora_A, self.lora_B, self.scale)
        if self.principal:
            flat = _add_low_rank(flat, x, self.base_A, self.base_B, -self.scale)
        return flat.view(out.shape)

    def delta_weight(self, layer) -> torch.Tensor:
        delta = self.lora_B.float() @ self.lora_A.float()
        if self.principal:
            delta = delta - self.base_B.float() @ self.base_A.float()
        return self.scale * delta

    def to_peft(self) -> dict[str, torch.Tensor]:
        """PEFT's tensors; PiSSA's ΔW = s(BA - B0A0) becomes the rank-2r pair [B, -B0], [A; A0]."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if self.principal:
            a = torch.cat([a, self.base_A.to(a.dtype)])
            b = torch.cat([b, -self.base_B.to(b.dtype)], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b}

    @staticmethod
    def from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"lora_A": tensors["lora_A.weight"], "lora_B": tensors["lora_B.weight"]}


def _add_low_rank(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale·(x Aᵀ) Bᵀ for 2-D ``out``, in the activations' dtype."""
    xa = linear(x.reshape(-1, x.shape[-1]), a)
    return torch.addmm(out, xa, (b * scale).to(xa.dtype).T)


def _principal_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A0, B0 with s·B0 A0 = the top-r SVD truncation of W (PiSSA), split as √σ on each side."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


class DoRAAdapter(LoRAAdapter):
    stackable: ClassVar[bool] = False  # reads the base weight for its norm

    def __init__(self, config: DoRA, site: Site):
        super().__init__(config, site)
        weight = site.weight()
        self.register_buffer("weight_sq", weight.pow(2).sum(1), persistent=False)
        self.magnitude = nn.Parameter(self.weight_sq.sqrt().clone())

    def row_norm(self, layer) -> torch.Tensor:
        """‖W0 + s·B A‖ per output row, in fp32 (or wider), without forming the out x in matrix."""
        w = weight_matrix(layer)
        return self._row_norm(w, self.lora_A.to(w.dtype))

    def _row_norm(self, w: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
        """The row norm from W0 and A in W0's dtype, in five small ops: M = 2s·W0Aᵀ + s²·B(AAᵀ) is one
        addmm, ‖W0‖² + Σ_k B_ik M_ik one batched (out x 1 x r)(out x r x 1) product (baddbmm). fp32, or
        the parameters' dtype where wider, also inside an autocast region (only W0 Aᵀ follows it)."""
        cross = w @ a_w.T
        dtype = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        with torch.autocast(w.device.type, enabled=False):
            a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)
            mixed = torch.addmm(cross.to(dtype), b, a @ a.T, beta=2 * self.scale, alpha=self.scale**2)
            norm_sq = torch.baddbmm(self.weight_sq[:, None, None].to(dtype), b[:, None, :], mixed[:, :, None])
        return norm_sq.view(-1).clamp_min(0).sqrt()

    def forward(self, layer, x, base):
        """m ⊙ (W0 + s·B A) x / ‖·‖_row + b, the norm a constant (computed without autograd). A's cast to
        the activations' dtype serves both W0 Aᵀ (norm) and x Aᵀ when W0 has that dtype. Where LoRA's update
        folds into the layer's product (see LoRAAdapter.forward), so does this one, with the gain m / ‖·‖
        applied to its output; otherwise the gain is one (out,) op and the low-rank sum rides on the B-GEMM."""
        w = weight_matrix(layer)
        a_x = self.lora_A.to(x.dtype)
        with torch.no_grad():
            norm = self._row_norm(w, a_x if w.dtype == x.dtype else self.lora_A.to(w.dtype))
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if not dropping and folds_into(layer) and folds_low_rank(layer, x):
            return folded_low_rank(layer, x, a_x, self.lora_B, self.scale, gain=self.magnitude / norm)
        out = base(x)
        gain = (self.magnitude / norm).to(out.dtype)
        h = self.dropout(x)
        if dropping:
            # The paper's form, W0 seeing the dropped input: out + (g - 1)·W0 h + g·s·B A h, computed as
            # out - W0 h + g·(W0 h + s·B A h) (one addmm and three passes over the output, not five).
            base_wx = linear(h, w)
            flat = _add_low_rank(base_wx.reshape(-1, base_wx.shape[-1]), h, a_x, self.lora_B, self.scale)
            return (out - base_wx).add_(flat.view(out.shape) * gain)
        # Without dropout W0 x is the base output minus its bias, and the whole update is one addmm
        # and one scaling pass: gain·(W0 x + s·B A x) + b.
        bias = layer.bias
        wx = out if bias is None else out - bias.to(out.dtype)
        flat = _add_low_rank(wx.reshape(-1, wx.shape[-1]), h, a_x, self.lora_B, self.scale)
        scaled = flat.view(out.shape) * gain
        return scaled if bias is None else scaled.add_(bias.to(out.dtype))

    def merged_matrix(self, layer) -> torch.Tensor:
        w = weight_matrix(layer).detach().float()
        updated = w + self.scale * (self.lora_B.float() @ self.lora_A.float())
        return updated * (self.magnitude.float() / updated.norm(dim=1))[:, None]

    def delta_weight(self, layer) -> torch.Tensor:
        return self.merged_matrix(layer) - weight_matrix(layer).detach().float()

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {**super().to_peft(), "lora_magnitude_vector": self.magnitude.detach()}

    @staticmethod
    def from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        magnitude = tensors.get("lora_magnitude_vector", tensors.get("lora_magnitude_vector.weight"))
        return {**LoRAAdapter.from_peft(tensors), "magnitude": magnitude}


# --------------------------------------------------------------------------------------------------


@register
@dataclass
class LoRA(LayerMethod):
    name: ClassVar[str] = "lora"
    family: ClassVar[str] = "low-rank"
    paper: ClassVar[str] = "LoRA, arXiv 2106.09685"
    formula: ClassVar[str] = "r·(in + out)"
    mergeable: ClassVar[bool] = True
    adapter_type: ClassVar[type] = LoRAAdapter

    r: int = config_field(8, "rank of the update")
    alpha: float = config_field(16.0, "scale numerator: s = alpha / r (alpha / √r with rslora)")
    dropout: float = config_field(0.05, "dropout on the adapter's input")
    rslora: bool = config_field(False, "rank-stabilised scaling s = alpha / √r")
    init: str = config_field("zeros", "zeros (A Kaiming, B 0) | gaussian (A ~ N(0,1/r), B 0) | pissa (top-r SVD)")

    @property
    def derives_from_weights(self) -> bool:  # PiSSA's frozen principal part comes from W0
        return self.init == "pissa"

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.init in INITS, self.name, f"init must be one of {INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return self.adapter_type(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features)

    def to_peft(self) -> dict:
        rank, alpha = self.r, self.alpha
        if self.init == "pissa":  # exported at rank 2r with the same scale s
            rank, alpha = 2 * self.r, self.alpha * (math.sqrt(2) if self.rslora else 2)
        return {"r": rank, "lora_alpha": alpha, "lora_dropout": self.dropout, "use_rslora": self.rslora,
                "use_dora": self.name == "dora"}

    @classmethod
    def from_peft(cls, peft: dict) -> LoRA | None:
        if peft.get("peft_type") != "LORA" or bool(peft.get("use_dora")) != (cls.name == "dora"):
            return None
        return cls(r=int(peft["r"]), alpha=float(peft["lora_alpha"]), dropout=float(peft.get("lora_dropout", 0.0)),
                   rslora=bool(peft.get("use_rslora", False)))


@register
@dataclass
class DoRA(LoRA):
    name: ClassVar[str] = "dora"
    family: ClassVar[str] = "low-rank"
    paper: ClassVar[str] = "DoRA, arXiv 2402.09353"
    formula: ClassVar[str] = "r·(in + out) + out"
    adapter_type: ClassVar[type] = DoRAAdapter

    def validate(self) -> None:
        super().validate()
        check(self.init != "pissa", self.name, "init='pissa' is not defined for DoRA")

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features) + out_features


