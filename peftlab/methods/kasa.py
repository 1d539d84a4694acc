"""kasa: KaSA, drop W0's r smallest singular directions and learn a LoRA with a trainable diagonal.

Wang, Jiang, Park, Kim, Tang, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language
Models", arXiv 2412.06071. Official code: github.com/juyongjiang/KaSA, commit f85e88c (a patched HF
PEFT: ``peft/src/peft/tuners/lora/layer.py`` ``update_layer`` / ``get_delta_weight`` / ``forward``;
``main.py``: the GLUE loop, its defaults and the auxiliary loss). HF PEFT's ``KasaLinearVariant`` was
read for comparison.

With k = min(in, out) and the fp32 SVD W0 = U diag(σ) Vᵀ, the reference replaces the frozen base by
its rank-(k − r) truncation W_t and adds a LoRA whose middle is a learned diagonal d ("ΔΣ")::

    W_t = U[:, :k−r] diag(σ[:k−r]) V[:, :k−r]ᵀ                 the r smallest triplets dropped (frozen)
    y   = W_t x + b + s·B (d ⊙ A·dropout(x)),    s = alpha / r,  ΔW = s·B diag(d) A
    A: r x in (Kaiming-uniform, a = √5), B: out x r (zeros), d: r (N(0, 1)); all three train

peftlab never modifies W0: it keeps W0 and subtracts the dropped tail as a frozen rank-r term
(U_tail, σ_tail, V_tail: non-persistent buffers, recomputed from W0 on load)::

    y = base(x) − U_tail (σ_tail ⊙ V_tailᵀ x) + s·B (d ⊙ A·dropout(x))

Consequences: at init the model is the truncated one (B = 0, but W_t ≠ W0), so
``identity_at_init`` is False, exactly as in the reference; unlike the reference, ``disabled`` gives
the ORIGINAL base model (the reference's "disabled" is the truncated model, and its unmerge returns
W_t). ``merge`` writes W_t + s·B diag(d) A, the reference's merged weight. Stacking another adapter
on a KaSA layer is refused (``stackable = False``): the reference re-truncates the base per adapter,
and additive stacking would not reproduce it (HF PEFT forbids mixing KaSA too).

Trainable parameters per adapted layer: r·(in + out) + r. 4096 x 4096 at r = 8: 65,544; at r = 32:
262,176. LLaMA-3-8B, r = 32 on q, k, v, up, down: 56,628,224 (the released commonsense log).

Auxiliary loss (added to every micro-batch's task loss; the config's ``regularization``)::

    L_aux = (1/L_n) Σ_layers [ β·Σ_i d_i²  +  γ·( ‖Bᵀ B − I_r‖_F + ‖A Aᵀ − I_r‖_F ) ]

L_n = number of adapted layers (the official code divides by it; HF PEFT sums, so its β, γ are
effectively L_n times larger). Norms not squared; computed in fp32 (autocast disabled). The official code forms the
in x in / out x out Grams AᵀA − I_in and BBᵀ − I_out instead; ``orth_form="reference"`` gives that
value exactly, through ‖AᵀA − I_in‖_F² = ‖AAᵀ − I_r‖_F² + (in − r) (and likewise for B), i.e. with
r x r Grams only (no O(in²) memory). Default ``orth_form="gram"``: the paper's Eq. 11 / HF PEFT.

Defaults: the official ``main.py`` (GLUE): r 8, alpha 16 (s = 2), dropout 0, β 1e-4, γ 1e-3, targets
PEFT's defaults (query, value: roles q, v). Its LLM commonsense recipe (LLM-Adapters pipeline):
r 32, alpha 64, dropout 0.05, targets q, k, v, up, down (``targets=["q_proj", "k_proj", "v_proj",
"up_proj", "down_proj"]`` on LLaMA), lr 3e-4.

Deviations: the official layer truncates ``in − r`` directions, which is right only when in ≤ out
(for out < in, e.g. down_proj, it drops nothing); peftlab uses k = min(in, out), as HF PEFT does, and
requires r < k. Non-destructive truncation as described above. GPT-2's Conv1D is handled through its
(out, in) view (HF refuses it); its fused c_attn gets one SVD of the fused matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear, weight_matrix
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.stacked import gram_gaps, shape_groups

ORTH_FORMS = ("gram", "reference")


class KaSAAdapter(LayerAdapter):
    # Not a weight read: the frozen tail is derived from W0, and the reference truncates the base once per
    # adapter, which additive stacking would not reproduce; the flag makes the core refuse stacking.
    stackable: ClassVar[bool] = False

    def __init__(self, config: KaSA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        k = min(fan_in, fan_out)
        u, sigma, vh = torch.linalg.svd(site.weight(), full_matrices=False)
        self.register_buffer("tail_U", u[:, k - r:].contiguous(), persistent=False)  # out x r
        self.register_buffer("tail_S", sigma[k - r:].contiguous(), persistent=False)  # r (smallest)
        self.register_buffer("tail_Vh", vh[k - r:].contiguous(), persistent=False)  # r x in
        self.lora_A = nn.Parameter(torch.zeros(r, fan_in, device=site.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r, device=site.device))
        self.lora_diag = nn.Parameter(torch.zeros(r, device=site.device))
        if site.restoring:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_diag.normal_()

    def forward(self, layer, x, base):
        h = linear(self.dropout(x), self.lora_A)
        update = linear(h * self.lora_diag.to(h.dtype), self.lora_B) * self.scale
        t = linear(x, self.tail_Vh)
        tail = linear(t * self.tail_S.to(t.dtype), self.tail_U)
        return base(x) - tail + update

    def tail_weight(self) -> torch.Tensor:
        """W0 − W_t: the dropped rank-r part, (out, in) fp32."""
        return (self.tail_U * self.tail_S) @ self.tail_Vh

    def truncated_weight(self, layer) -> torch.Tensor:
        """W_t, the reference's frozen base (fp32, (out, in))."""
        return weight_matrix(layer).detach().float() - self.tail_weight()

    def update_weight(self) -> torch.Tensor:
        """s·B diag(d) A, (out, in) fp32."""
        return self.scale * (self.lora_B.float() * self.lora_diag.float()) @ self.lora_A.float()

    def delta_weight(self, layer) -> torch.Tensor:
        return self.update_weight() - self.tail_weight()


def _squared_gaps(factors: list[nn.Parameter], rows: bool, eye: torch.Tensor, reference: bool) -> torch.Tensor:
    """‖AAᵀ − I_r‖_F² (rows) or ‖BᵀB − I_r‖_F² of each factor of one shape, fp32; with ``reference``,
    ‖AᵀA − I_in‖_F² or ‖BBᵀ − I_out‖_F², which exceed them by the constant n − r (n = in or out)."""
    stacked = torch.stack(factors).float()
    gaps = gram_gaps(stacked, rows, eye).pow(2).sum((1, 2))
    return gaps + (stacked.shape[2 if rows else 1] - eye.shape[0]) if reference else gaps


def _all_squared_gaps(layers: list[KaSAAdapter], eye: torch.Tensor, reference: bool) -> torch.Tensor:
    """``_squared_gaps`` of every layer's A and B, one batched Gram per factor shape."""
    gaps = []
    for rows, factors in ((True, [a.lora_A for a in layers]), (False, [a.lora_B for a in layers])):
        gaps += [_squared_gaps([factors[i] for i in group], rows, eye, reference) for group in shape_groups(factors)]
    return torch.cat(gaps)


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """√value with gradient 0 (not NaN) at 0, like ``torch.linalg.norm`` of a zero matrix."""
    positive = value > 0
    return torch.where(positive, value.clamp_min(1e-30).sqrt(), value.new_zeros(()))


@register
@dataclass
class KaSA(LayerMethod):
    name: ClassVar[str] = "kasa"
    family: ClassVar[str] = "SVD"
    paper: ClassVar[str] = "KaSA, arXiv 2412.06071"
    formula: ClassVar[str] = "r·(in + out) + r"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = False  # the base is truncated (r smallest triplets dropped) at init
    derives_from_weights: ClassVar[bool] = True
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v")  # main.py: PEFT's defaults (query, value)

    r: int = config_field(8, "rank: LoRA rank = number of smallest singular triplets dropped from W0")
    alpha: float = config_field(16.0, "scale numerator: s = alpha / r")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    beta: float = config_field(1e-4, "β: weight of Σ d² in the auxiliary loss")
    gamma: float = config_field(1e-3, "γ: weight of the orthogonality terms in the auxiliary loss")
    orth_form: str = config_field("gram", "gram: ‖BᵀB−I_r‖+‖AAᵀ−I_r‖ (paper, HF) | reference: ‖BBᵀ−I_out‖+‖AᵀA−I_in‖")

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, self.name,
              f"alpha must be positive, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        for field_name in ("beta", "gamma"):
            value = getattr(self, field_name)
            check(isinstance(value, (int, float)) and value >= 0, self.name,
                  f"{field_name} must be a non-negative number, got {value!r}")
        check(self.orth_form in ORTH_FORMS, self.name, f"orth_form must be one of {ORTH_FORMS}, got {self.orth_form!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def build(self, site: Site) -> LayerAdapter:
        if self.r >= min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} must be below min(in, out) = {min(site.features)} at "
                              f"{site.path} (at least one singular direction of W0 must remain)")
        return KaSAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return self.r * (in_features + out_features) + self.r

    def regularization(self, adapters: dict[str, nn.Module]) -> torch.Tensor | None:
        """(1/L_n)·Σ_layers [β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)] (official ``loss_fn``), with one batched
        Gram per factor shape: a fixed number of kernels however many layers (a per-layer loop launched ~56 a
        layer)."""
        layers = [a for a in adapters.values() if isinstance(a, KaSAAdapter)]
        if not layers or (self.beta == 0 and self.gamma == 0):
            return None
        device = layers[0].lora_diag.device
        with torch.autocast(device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            eye = torch.eye(self.r, device=device)
            gaps = _all_squared_gaps(layers, eye, self.orth_form == "reference")
            diag = torch.stack([a.lora_diag for a in layers]).float()
            total = self.beta * diag.pow(2).sum() + self.gamma * _safe_sqrt(gaps).sum()
        return total / len(layers)
