"""BitFit: bias-only fine-tuning (Ben Zaken et al. 2021, arXiv 2106.10199).

BitFit trains the bias terms of a pre-trained transformer and nothing else. Every bias is an
additive term of its layer's output, so peftlab trains a delta added after the frozen layer::

    y = layer(x) + Δb            Δb starts at 0;   merge: b <- b + Δb

This is exact for linear layers and for norms (N(x) = n(x) ⊙ f(γ) + β: adding to the output is
adding to β whatever f is). Official code: benzakenelad/BitFit, commit ca29e2a9
(``glue_evaluator.py``): the default ``--bias-terms all`` unfreezes every parameter whose name
contains "bias", i.e. the biases of the q, k, v, attention-output, intermediate and output linears
and of every LayerNorm (embeddings' included), plus the pooler's (the classification head, which it
also trains, is the task's, not the adapter's).

Defaults [peftlab, following the paper and its code]: every linear (nn.Linear, GPT-2's Conv1D) and
every norm layer that *has* a bias, output heads excluded. BERT-base: 12 x (4·768 + 3072 + 768 +
2·768) + 768 (embeddings' LayerNorm) = 102,144. The paper reports 0.08% of BERT-large's
parameters, which is this count on BERT-large (24 x (4·1024 + 4096 + 1024 + 2·1024) + 1024 =
271,360 of 335M). A pooler's bias counts too (+768 on BERT-base), as in the official code.

Bias-free models. LLaMA-family models have no bias at all (bias-free projections, RMSNorm without
β), so BitFit as published has nothing to train and ``adapt`` raises a TargetError saying so.
``add_bias=True`` [not in the paper] gives the bias-free linear layers that a method adapts by
default (q k v o gate up down in a known architecture, else every bias-free linear but the heads)
a zero-initialised bias as well, as the (IA)³ authors' BitFit baseline does for the bias-free T5
(r-three/t-few, ``src/models/bitfit.py``). Merging such an adapter adds a ``bias`` parameter to
those layers: the merged model then has biases its config (``attention_bias`` / ``mlp_bias``) does
not announce.

Trainable parameters: the size of each adapted bias (out per linear, n per norm over n features).
LLaMA-2-7B with ``add_bias=True``: 32 x (4·4096 + 2·11008 + 4096) = 1,359,872.

[peftlab] Norms whose bias is per channel on a non-last axis (BatchNorm, GroupNorm) are not adapted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import TargetError
from peftlab.core.layers import is_linear, is_norm
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, config_field
from peftlab.core.registry import register
from peftlab.core.targets import ARCHITECTURE_ROLES, ROLES, candidate_modules, model_type, paths_for_roles

from .lntuning import exact_paths, outside_heads


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def last_axis_norm(module: nn.Module) -> bool:
    return is_norm(module) and not isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))


def add_to_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """b <- b + delta in the layer's dtype; a bias-free layer gets a new ``bias`` parameter."""
    with torch.no_grad():
        bias = bias_of(layer)
        if bias is None:
            weight = layer.weight
            layer.bias = nn.Parameter(delta.detach().to(weight.device, weight.dtype).clone(),
                                      requires_grad=weight.requires_grad)
        else:
            bias.copy_((bias.float() + delta.float().to(bias.device)).to(bias.dtype))


class BitFitAdapter(LayerAdapter):
    def __init__(self, config: BitFit, site: Site):
        super().__init__()
        bias = bias_of(site.module)
        shape = bias.shape if bias is not None else (site.out_features,)
        self.delta = nn.Parameter(torch.zeros(shape, device=site.device))

    def forward(self, layer, x, base):
        out = base(x)
        return out + self.delta.to(out.dtype)

    def merge_into(self, layer) -> None:
        add_to_bias(layer, self.delta)


@register
@dataclass
class BitFit(LayerMethod):
    name: ClassVar[str] = "bitfit"
    family: ClassVar[str] = "selective"
    paper: ClassVar[str] = "BitFit, arXiv 2106.10199"
    formula: ClassVar[str] = "size of the bias (out per linear, n per norm)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    kind: ClassVar[str] = "biased linear or norm"

    add_bias: bool = config_field(False, "also give bias-free linears a zero-initialised trainable bias "
                                         "(not in the paper; needed for LLaMA-like models)")
    norms: bool = config_field(True, "include the biases of norm layers (LayerNorm β), as the paper does")

    def validate(self) -> None:
        check(isinstance(self.add_bias, bool), self.name, f"add_bias must be true or false, got {self.add_bias!r}")
        check(isinstance(self.norms, bool), self.name, f"norms must be true or false, got {self.norms!r}")

    def has_bias(self, module: nn.Module) -> bool:
        if bias_of(module) is None:
            return False
        return is_linear(module) or (self.norms and last_axis_norm(module))

    def bias_free_linear(self, module: nn.Module) -> bool:
        return is_linear(module) and bias_of(module) is None

    def accepts(self, module: nn.Module) -> bool:
        return self.has_bias(module) or (self.add_bias and self.bias_free_linear(module))

    def default_targets(self, model: nn.Module) -> str:
        modules = list(candidate_modules(model))
        paths = outside_heads(model, [p for p, m in modules if self.has_bias(m)])
        if self.add_bias:
            if model_type(model) in ARCHITECTURE_ROLES:
                added = paths_for_roles(model, ROLES, self.bias_free_linear)
            else:  # unknown architecture: every bias-free linear but the heads
                added = outside_heads(model, [p for p, m in modules if self.bias_free_linear(m)])
            paths += [p for p in added if p not in paths]
        if not paths:
            kind = model_type(model) or type(model).__name__
            hint = ("pass add_bias=True to give its projections zero-initialised trainable biases (not in the "
                    "paper), or use a method that needs no bias (lntuning, ia3, lora)")
            if self.add_bias:
                hint = "it has no linear layer either"
            raise TargetError(f"{self.name}: this {kind} model has no bias terms: BitFit trains existing biases "
                              f"only; {hint}")
        return exact_paths(paths)

    def build(self, site: Site) -> LayerAdapter:
        return BitFitAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int:
        return out_features
