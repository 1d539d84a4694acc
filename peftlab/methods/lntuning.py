"""Norm-layer tuning as in GenD (Yermakov et al. 2025, arXiv 2508.06248, "Deepfake Detection that
Generalizes Across Benchmarks").

GenD fine-tunes only the affine parameters of a pre-trained encoder's normalisation layers: the
weight γ and bias β of every LayerNorm (0.03% of a CLIP ViT-L/14). Its official code
(yermandy/GenD, commit b26c2b25: ``src/exp/examples.py`` unfreezes ``pre_layrnorm``, ``layer_norm1``,
``layer_norm2`` and ``post_layernorm``; ``src/model/GenD.py`` trains them without weight decay)
updates the weights in place. peftlab keeps them frozen and trains deltas instead::

    N(x; γ, β) = n(x) ⊙ f(γ) + β         n: the normalisation; f(γ) = γ (LayerNorm, Llama's RMSNorm)
                                                          or 1 + γ (Gemma's RMSNorm)
    y = N(x; γ0 + Δγ, β0 + Δβ) = N(x; γ0, β0) + [N(x; Δγ, Δβ) - N(x; 0, 0)]
    merge:  γ <- γ0 + Δγ,  β <- β0 + Δβ                                   Δγ, Δβ start at 0

The identity holds for any norm whose output is affine in its weight and bias, so the adapter never
needs to know the formula: the bracket is computed by calling the norm's *own* ``forward`` on a
shallow stand-in whose weight and bias are (Δγ, Δβ) and (0, 0); the registered tensors are not
touched. For the usual norms N(x; 0, 0) is identically zero (checked once when the adapter is
built) and that second call is skipped; Gemma-style norms (f(0) = 1) need it. The model's own
forward runs unchanged (``base``), so the adapter stacks with others on the same norm, the output
at init is exactly the base output, and Δγ trains with exactly the gradient γ would get.

Defaults: every normalisation layer of the model (LayerNorm and the RMSNorm classes transformers
defines per model; output heads excluded), weight and bias where the layer has one, as GenD. The
task head, the L2-normalised features and the alignment/uniformity losses of GenD belong to the
task and are not part of this adapter. Use weight decay 0 on these parameters, as GenD does (with
decoupled decay, a delta decays towards γ0, not towards 0).

Trainable parameters per adapted norm over n features: n, plus n when it has a bias (and
``bias=True``). LLaMA-2-7B: 65 RMSNorms of 4096, no biases: 266,240. The paper: 0.03% of the
encoder (CLIP ViT-L/14: 2·2·1024 per block x 24, plus the pre- and post-norms = 102,400).

[peftlab] BatchNorm layers are not adapted: in training mode the extra calls would update their
running statistics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core.errors import TargetError
from peftlab.core.layers import is_norm
from peftlab.core.method import LayerAdapter, LayerMethod, Site, check, config_field
from peftlab.core.registry import register
from peftlab.core.targets import ADAPTER_CONTAINER, candidate_modules, output_head_paths


def tunable_norm(module: nn.Module) -> bool:
    """A normalisation layer with a weight tensor (BatchNorm excluded: it keeps running statistics)."""
    return (is_norm(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
            and not isinstance(module, nn.modules.batchnorm._BatchNorm))


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def norm_with(norm: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``norm``'s own forward on ``x`` with its weight (and bias) replaced, on a shallow stand-in.

    The stand-in shares everything else with ``norm`` (eps, flags, buffers) but not the parameter
    dict, and has neither peftlab's instance-level forward nor its adapter container, so neither the
    norm nor its adapters are touched or re-entered.
    """
    stand_in = object.__new__(type(norm))
    state = dict(norm.__dict__)
    state.pop("forward", None)
    parameters = dict(norm._parameters)
    parameters["weight"] = weight
    if parameters.get("bias") is not None:
        parameters["bias"] = bias if bias is not None else torch.zeros_like(weight)
    state["_parameters"] = parameters
    state["_modules"] = {k: v for k, v in norm._modules.items() if k != ADAPTER_CONTAINER}
    stand_in.__dict__.update(state)
    return type(norm).forward(stand_in, x)


def vanishes_at_zero(norm: nn.Module) -> bool:
    """True when N(x; 0, 0) = 0 (f(0) = 0), probed on a fixed input; False for Gemma's 1 + γ."""
    weight = norm.weight
    if weight.device.type == "meta":
        return False  # cannot be probed; the two-call form is exact for every norm
    probe = torch.randn((2, *weight.shape), generator=torch.Generator().manual_seed(0)).to(weight)
    zero = torch.zeros_like(weight)
    with torch.no_grad():
        out = norm_with(norm, probe, zero, None if norm_bias(norm) is None else zero)
    return bool((out == 0).all())


class NormTuningAdapter(LayerAdapter):
    def __init__(self, config: LNTuning, site: Site):
        super().__init__()
        norm = site.module
        self.weight_delta = nn.Parameter(torch.zeros(norm.weight.shape, device=site.device))
        bias = norm_bias(norm)
        tune_bias = config.bias and bias is not None
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape, device=site.device)) if tune_bias else None
        self.vanishes_at_zero = vanishes_at_zero(norm)  # a property of the formula, recomputed on load

    def update(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """N(x; Δγ, Δβ) - N(x; 0, 0): the output change caused by the deltas, in the norm's dtype."""
        dtype = norm.weight.dtype
        weight = self.weight_delta.to(dtype)
        bias = None if self.bias_delta is None else self.bias_delta.to(dtype)
        change = norm_with(norm, x, weight, bias)
        if not self.vanishes_at_zero:
            change = change - norm_with(norm, x, torch.zeros_like(weight), None)
        return change

    def forward(self, layer, x, base):
        out = base(x)
        return out + self.update(layer, x).to(out.dtype)

    def merge_into(self, layer) -> None:
        with torch.no_grad():
            weight = layer.weight
            weight.copy_((weight.float() + self.weight_delta.float().to(weight.device)).to(weight.dtype))
            if self.bias_delta is not None:
                bias = layer.bias
                bias.copy_((bias.float() + self.bias_delta.float().to(bias.device)).to(bias.dtype))


def exact_paths(paths: list[str]) -> str:
    """A targets regex matching exactly ``paths``."""
    return "|".join(re.escape(p) for p in paths)


def outside_heads(model: nn.Module, paths: list[str]) -> list[str]:
    heads = output_head_paths(model)
    return [p for p in paths if not any(p == h or p.startswith(h + ".") for h in heads)]


@register
@dataclass
class LNTuning(LayerMethod):
    name: ClassVar[str] = "lntuning"
    family: ClassVar[str] = "selective"
    paper: ClassVar[str] = "GenD: Deepfake Detection that Generalizes Across Benchmarks, arXiv 2508.06248"
    formula: ClassVar[str] = "n (+ n where the norm has a bias)"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    kind: ClassVar[str] = "norm"
    default_roles: ClassVar[tuple[str, ...]] = ()

    bias: bool = config_field(True, "also tune the norm's bias where it has one (GenD: yes)")

    def validate(self) -> None:
        check(isinstance(self.bias, bool), self.name, f"bias must be true or false, got {self.bias!r}")

    def accepts(self, module: nn.Module) -> bool:
        return tunable_norm(module)

    def default_targets(self, model: nn.Module) -> str:
        paths = outside_heads(model, [p for p, m in candidate_modules(model) if tunable_norm(m)])
        if not paths:
            raise TargetError(f"{self.name}: this model has no normalisation layer with a weight to tune")
        return exact_paths(paths)

    def build(self, site: Site) -> LayerAdapter:
        return NormTuningAdapter(self, site)

    def trainable_count(self, in_features: int, out_features: int, role: str | None = None) -> int | None:
        return None if self.bias else in_features  # with a bias the count depends on the norm: see below

    def attachment_count(self, sites) -> int:
        """n per norm, plus n where it has a bias and ``bias`` is on: read from the modules themselves."""
        return sum(module.weight.numel() * (2 if self.bias and norm_bias(module) is not None else 1)
                   for module, _ in sites)
