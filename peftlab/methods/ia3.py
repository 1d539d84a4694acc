"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
arXiv 2205.05638, the T-Few paper).

Learned vectors rescale the attention keys and values and the inner activation of the feed-forward
block; they start at 1, so the model starts as the base model::

    k = l_k ⊙ (W_k x + b_k),   v = l_v ⊙ (W_v x + b_v)             output scaling (out values)
    FFN: W_down (l_ff ⊙ h),  h = the FFN's inner activation          input scaling (in values)
    merge:  W <- diag(l) W, b <- l ⊙ b (output scaling);   W <- W diag(l_ff) (input scaling)

Placement follows HF PEFT's convention (``TRANSFORMERS_MODELS_TO_IA3_*`` in PEFT 0.21): the vector of
the FFN sits on the input of its down projection, i.e. it scales the activation after the
non-linearity (the paper's (l_ff ⊙ γ(W1 x)) W2); the official T-Few code (r-three/t-few, commit
5edc84bb, ``configs/ia3.json`` and ``src/models/lora.py``) scales the output of T5's ``wi_1``, which
is the same function for a gated FFN. Keys and values are scaled on their projections' outputs
(bias included, as PEFT), and the adapted model equals PEFT's IA3 model given the same vectors (the
tests check it).

Defaults: roles k, v (output scaling) and down (``feedforward``: input scaling). For GPT-2 the k and
v roles resolve to the fused ``c_attn``, whose whole output (queries included) is scaled, as in
PEFT. Deviations from PEFT's own per-model target lists, where those depart from the paper: some
entries scale other projections (Gemma, Qwen2: q and v; OPT: q and k), and the BERT entry
``output.dense`` also matches ``attention.output.dense`` (input-scaled as if it were the FFN);
peftlab uses k, v, down everywhere. ``targets=["key", "value", "output.dense"],
feedforward=("output.dense",)`` reproduces PEFT's BERT placement.

Trainable parameters per adapted (in -> out) layer: out, or in for a feedforward one. LLaMA-2-7B:
32 x (4096 + 4096 + 11008) = 614,400 (0.009% of 6.74B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.layers import set_weight_matrix, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, config_field
from peftlab.core.registry import register
from peftlab.core.targets import ROLES

from .bitfit import bias_of


class IA3Adapter(LayerAdapter):
    def __init__(self, config: IA3, site: Site, feedforward: bool):
        super().__init__()
        fan_in, fan_out = site.features
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(fan_in if feedforward else fan_out, device=site.device))

    def forward(self, layer, x, base):
        if self.feedforward:
            return base(x * self.ia3_l.to(x.dtype))
        out = base(x)
        return out * self.ia3_l.to(out.dtype)

    def delta_weight(self, layer) -> torch.Tensor:
        matrix = weight_matrix(layer).detach().float()
        gain = self.ia3_l.float() - 1
        return matrix * (gain[None, :] if self.feedforward else gain[:, None])

    def merge_into(self, layer) -> None:
        with torch.no_grad():
            matrix = weight_matrix(layer).float()
            gain = self.ia3_l.float().to(matrix.device)
            set_weight_matrix(layer, matrix * (gain[None, :] if self.feedforward else gain[:, None]))
            bias = bias_of(layer)
            if bias is not None and not self.feedforward:
                bias.copy_((bias.float() * gain.to(bias.device)).to(bias.dtype))


def path_matches(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


@register
@dataclass
class IA3(LayerMethod):
    name: ClassVar[str] = "ia3"
    family: ClassVar[str] = "scaling"
    paper: ClassVar[str] = "(IA)^3 / T-Few, arXiv 2205.05638"
    formula: ClassVar[str] = "out (k, v: output scaling) or in (down: input scaling)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    default_roles: ClassVar[tuple[str, ...]] = ("k", "v", "down")

    feedforward: tuple[str, ...] = config_field(("down",), "roles or module-path suffixes whose *input* is "
                                                           "scaled (the FFN's inner activation)")

    def validate(self) -> None:
        check(isinstance(self.feedforward, tuple) and all(isinstance(f, str) and f for f in self.feedforward),
              self.name, f"feedforward must be a list of roles or module-path suffixes, got {self.feedforward!r}")

    def is_feedforward(self, path: str, role: str | None) -> bool:
        return any(entry == role if entry in ROLES else path_matches(path, entry) for entry in self.feedforward)

    def build(self, site: Site) -> LayerAdapter:
        return IA3Adapter(self, site, self.is_feedforward(site.path, site.role))

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int | None:
        if not all(entry in ROLES for entry in self.feedforward):
            return None  # decided by module paths, which the count does not see
        return in_features if role in self.feedforward else out_features
