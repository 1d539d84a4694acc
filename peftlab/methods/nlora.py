"""NLoRA, SLoRA and IntTune: LoRA with an r x r middle matrix (Guo, Chang, Wu 2025, arXiv 2502.14482).

One registered method, ``nlora``, with a ``variant`` option::

    x ──► W0 ─────────────────────────────┐
    │                                     ▼
    └─► dropout ─► A ─► N ─► B ─► (· s) ─► (+) ─► y      A: r x in, N: r x r, B: out x r, s = alpha / r

    y = W0 x + b + s · B N A dropout(x)

* ``variant="nlora"`` (default), Nyström-style init from W0's leading blocks, as the released code does it:
  A = W0[:r, :], N = W0[:r, :r], B = W0[:, :r] (plain copies; the pseudo-inverse of the Nyström formula
  W ≈ C W11^+ R is commented out in the code). The output is NOT the base at init:
  ΔW0 = s · W0[:, :r] W0[:r, :r] W0[:r, :], and W0 is not reduced. A, N, B train.
* ``variant="slora"``: A, N ~ Kaiming-uniform(a=√5) (bounds 1/√in and 1/√r), B = 0, so the output is the
  base at init (the paper's figure draws A Gaussian; the code uses Kaiming-uniform, followed here).
* ``variant="inttune"``: the NLoRA init, then only N trains (A, B frozen, ``inttune.py``).

Options beyond the code, off by default: ``nystrom_pinv=True`` sets N = pinv(W0[:r, :r]) (the Nyström
formula: B N A then reproduces W0 on its first r rows and columns); ``residual=True`` subtracts the
initial s·B0 N0 A0 as a frozen term in the forward (PiSSA-style; W0 itself is never modified), so the
output is the base at init.

Trainable parameters per adapted layer: r·(in + out) + r² (nlora, slora); r² (inttune).
On a 4096 x 4096 layer with r = 128: 1,064,960 (inttune: 16,384). LLaMA-2-7B, 7 projections x 32 layers:
the N matrices alone are 3,670,016, the paper's "3.67 million additional trainable parameters".

Defaults from the released LLaMA-2-7B scripts (github.com/TracyGuo2001/NLoRA, commit b66f88d,
``scripts/run_{nlora,inttune}.sh``; code in ``peft/src/peft/tuners/lora/layer.py``: ``nlora_init``,
``slora_init``, forward, ``get_delta_weight``): r = 128, alpha = 128 (s = 1), dropout 0, targets q, k,
v, o, gate, up, down; training lr 2e-4, AdamW, no weight decay, cosine schedule, warm-up ratio 0.03,
1 epoch of MetaMathQA train[:100000], max length 512. The scripts' argument defaults are r = 8,
alpha = 8. The batch: a comment says 128, the command gives 1 per device x 4 accumulation x 4 GPUs = 16.

Deviations from the code, and why:

* Blocks are taken from W0 as an (out, in) matrix on every layer type; the code slices the stored
  weight, which for GPT-2's Conv1D is (in, out).
* The code creates N only for the first adapter on a layer (``if lora_A and not lora_N``); here every
  adapter has its own N.
* IntTune's frozen A and B are buffers recomputed from W0 on load (not saved); the adapter file then
  only holds N, and loading it on other base weights is refused.
* SLoRA's random init uses a local torch.Generator (``seed`` option; None draws a seed from torch's
  global RNG), not the global RNG directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layers import linear
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, check_positive_ints, config_field
from peftlab.core.registry import register
from peftlab.core.seeding import offset_generator

VARIANTS = ("nlora", "slora", "inttune")


def nystrom_factors(weight: torch.Tensor, r: int, pinv: bool = False):
    """(A, N, B) = (W[:r, :], W[:r, :r] or its pseudo-inverse, W[:, :r]) of an (out, in) fp32 matrix."""
    middle = torch.linalg.pinv(weight[:r, :r]) if pinv else weight[:r, :r]
    return weight[:r, :].clone(), middle.clone(), weight[:, :r].clone()


class NLoRAAdapter(LayerAdapter):
    def __init__(self, config: NLoRA, site: Site):
        super().__init__()
        fan_in, fan_out = site.features
        r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.residual = config.residual
        shapes = {"lora_A": (r, fan_in), "lora_N": (r, r), "lora_B": (fan_out, r)}
        if config.variant == "slora":
            for key, shape in shapes.items():
                setattr(self, key, nn.Parameter(torch.zeros(shape, device=site.device)))
            if not site.restoring:
                gen = offset_generator(config.seed, site.path)
                with torch.no_grad():
                    for key in ("lora_A", "lora_N"):
                        value = torch.empty(shapes[key])
                        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
                        getattr(self, key).copy_(value)
            return
        # nlora / inttune: deterministic from W0; frozen copies are recomputed also when restoring
        a0, n0, b0 = nystrom_factors(site.weight(), r, config.nystrom_pinv)
        if config.variant == "inttune":  # only the middle trains
            self.register_buffer("lora_A", a0, persistent=False)
            self.register_buffer("lora_B", b0, persistent=False)
            self.lora_N = nn.Parameter(n0.clone())
            if self.residual:
                self.register_buffer("base_N", n0, persistent=False)
            return
        self.lora_A = nn.Parameter(a0.clone())
        self.lora_N = nn.Parameter(n0.clone())
        self.lora_B = nn.Parameter(b0.clone())
        if self.residual:
            self.register_buffer("base_A", a0, persistent=False)
            self.register_buffer("base_N", n0, persistent=False)
            self.register_buffer("base_B", b0, persistent=False)

    def _frozen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The initial (A0, N0, B0) that ``residual`` subtracts."""
        if hasattr(self, "base_A"):
            return self.base_A, self.base_N, self.base_B
        return self.lora_A, self.base_N, self.lora_B  # inttune: A and B never move

    def forward(self, layer, x, base):
        out = base(x)
        delta = linear(linear(linear(self.dropout(x), self.lora_A), self.lora_N), self.lora_B)
        if self.residual:
            a0, n0, b0 = self._frozen()
            delta = delta - linear(linear(linear(x, a0), n0), b0)
        return out + delta * self.scale

    def delta_weight(self, layer) -> torch.Tensor:
        delta = self.lora_B.float() @ self.lora_N.float() @ self.lora_A.float()
        if self.residual:
            a0, n0, b0 = self._frozen()
            delta = delta - b0.float() @ n0.float() @ a0.float()
        return self.scale * delta

    def to_peft(self) -> dict[str, torch.Tensor]:
        """A plain LoRA pair: N folded into B (B' = B N); with ``residual`` rank 2r, [B N, -B0 N0], [A; A0]."""
        a = self.lora_A.detach().float()
        b = self.lora_B.detach().float() @ self.lora_N.detach().float()
        if self.residual:
            a0, n0, b0 = self._frozen()
            a = torch.cat([a, a0.float()])
            b = torch.cat([b, -(b0.float() @ n0.float())], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b}


@register
@dataclass
class NLoRA(LayerMethod):
    name: ClassVar[str] = "nlora"
    family: ClassVar[str] = "SVD"  # the spec index groups it with the SVD-family inits (weight-derived)
    paper: ClassVar[str] = "NLoRA, arXiv 2502.14482"
    formula: ClassVar[str] = "r·(in + out) + r² (inttune: r²)"
    mergeable: ClassVar[bool] = True

    r: int = config_field(128, "rank: A is r x in, N r x r, B out x r (r <= min(in, out))")
    alpha: float = config_field(128.0, "scale numerator: s = alpha / r")
    dropout: float = config_field(0.0, "dropout on the adapter's input")
    variant: str = config_field("nlora", "nlora (W0-block init) | slora (Kaiming A, N; B 0) | inttune (only N trains)")
    nystrom_pinv: bool = config_field(False, "N = pinv(W0[:r, :r]) instead of W0[:r, :r] (not the released code)")
    residual: bool = config_field(False, "subtract the initial s·B0 N0 A0 as a frozen term (not the released code)")
    seed: int | None = config_field(None, "seed of slora's random init (None: drawn from torch's global RNG)")

    @property
    def identity_at_init(self) -> bool:  # B = 0 (slora) or the initial product subtracted (residual)
        return self.variant == "slora" or self.residual

    @property
    def derives_from_weights(self) -> bool:  # frozen tensors recomputed from W0 on load
        return self.variant == "inttune" or self.residual

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        check_positive_ints(self, "r")
        check(isinstance(self.alpha, (int, float)) and self.alpha != 0, self.name,
              f"alpha must be a non-zero number, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, self.name, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.variant in VARIANTS, self.name, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        check(self.variant != "slora" or not (self.nystrom_pinv or self.residual), self.name,
              "nystrom_pinv and residual apply to the W0-block init (variant nlora or inttune), not slora")
        check(self.seed is None or isinstance(self.seed, int), self.name, "seed must be an integer or None")

    def build(self, site: Site) -> LayerAdapter:
        if self.r > min(site.features):
            raise ConfigError(f"{self.name}: r={self.r} exceeds min(in, out) = {min(site.features)} at {site.path}")
        return NLoRAAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        middle = self.r * self.r
        return middle if self.variant == "inttune" else self.r * (in_features + out_features) + middle

    def to_peft(self) -> dict:
        rank, alpha = (2 * self.r, 2 * self.alpha) if self.residual else (self.r, self.alpha)
        return {"r": rank, "lora_alpha": alpha, "lora_dropout": self.dropout, "use_rslora": False,
                "use_dora": False}
