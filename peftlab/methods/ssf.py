"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv 2210.08823), as used for
robustness to missing modalities by Reza et al. ("Robust Multimodal Learning with Missing
Modalities via Parameter-Efficient Adaptation", arXiv 2310.03986).

A per-feature affine map after each targeted layer::

    y = γ ⊙ (W x + b) + β          γ, β: one value per output feature
    merge:  W <- diag(γ) W,   b <- γ ⊙ b + β

Official code: dongzelian/SSF, commit 0135361b, ``models/vision_transformer.py`` (``ssf_ada`` after
the qkv, attention-output, fc1 and fc2 linears, after both LayerNorms of each block, after the
patch embedding and the final norm). Its ``init_ssf_scale_shift`` draws γ ~ N(1, 0.02) and
β ~ N(0, 0.02), so the adapted model differs slightly from the base at init. [peftlab] The
default ``init="ones"`` (γ = 1, β = 0: exactly the base model, so a missing-modality adaptation
starts from the pretrained network) departs from that code; ``init="normal"`` reproduces it. No
official code of arXiv 2310.03986 was found to check which of the two it uses.

Placement [peftlab]: after the seven projections (q k v o gate up down; the fused qkv of GPT-2
counts once), i.e. SSF's positions after linear layers. SSF after a norm layer is a
reparametrisation of the norm's own affine weight and bias; ``lntuning`` adapts those. Defaults
otherwise from the SSF paper and code: a scale and a shift per output feature.

Merging β into a bias-free linear (LLaMA's projections) adds a ``bias`` parameter to it; the merged
model then has biases its config does not announce. ``shift=False`` trains γ only and merges into
the weight alone.

Trainable parameters per adapted (in -> out) layer: 2·out (out with ``shift=False``). LLaMA-2-7B,
all seven projections: 32 x 2 x (4·4096 + 2·11008 + 4096) = 2,719,744.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.layers import set_weight_matrix, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, config_field
from peftlab.core.registry import register

from .bitfit import add_to_bias, bias_of

INITS = ("ones", "normal")


class SSFAdapter(LayerAdapter):
    def __init__(self, config: SSF, site: Site):
        super().__init__()
        width = site.out_features
        self.ssf_scale = nn.Parameter(torch.ones(width, device=site.device))
        self.ssf_shift = nn.Parameter(torch.zeros(width, device=site.device)) if config.shift else None
        if site.restoring or config.init == "ones":
            return
        with torch.no_grad():  # the official code's init_ssf_scale_shift
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            if self.ssf_shift is not None:
                nn.init.normal_(self.ssf_shift, std=0.02)

    def forward(self, layer, x, base):
        out = base(x)
        out = out * self.ssf_scale.to(out.dtype)
        if self.ssf_shift is not None:
            out = out + self.ssf_shift.to(out.dtype)
        return out

    def delta_weight(self, layer) -> torch.Tensor:
        return (self.ssf_scale.float() - 1)[:, None] * weight_matrix(layer).detach().float()

    def merge_into(self, layer) -> None:
        with torch.no_grad():
            scale = self.ssf_scale.float()
            matrix = weight_matrix(layer).float()
            set_weight_matrix(layer, matrix * scale.to(matrix.device)[:, None])
            bias = bias_of(layer)
            if bias is not None:
                bias.copy_((bias.float() * scale.to(bias.device)).to(bias.dtype))
            if self.ssf_shift is not None:
                add_to_bias(layer, self.ssf_shift)


@register
@dataclass
class SSF(LayerMethod):
    name: ClassVar[str] = "ssf"
    family: ClassVar[str] = "scaling"
    paper: ClassVar[str] = "SSF, arXiv 2210.08823 (as in missing-modality adaptation, arXiv 2310.03986)"
    formula: ClassVar[str] = "2·out (out with shift=False)"
    mergeable: ClassVar[bool] = True

    init: str = config_field("ones", "ones (γ = 1, β = 0: the base model) | normal (official code: "
                                     "γ ~ N(1, 0.02), β ~ N(0, 0.02))")
    shift: bool = config_field(True, "train the shift β as well as the scale γ")

    @property
    def identity_at_init(self) -> bool:
        return self.init == "ones"

    def validate(self) -> None:
        check(self.init in INITS, self.name, f"init must be one of {INITS}, got {self.init!r}")
        check(isinstance(self.shift, bool), self.name, f"shift must be true or false, got {self.shift!r}")

    def build(self, site: Site) -> LayerAdapter:
        return SSFAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return out_features * (2 if self.shift else 1)
