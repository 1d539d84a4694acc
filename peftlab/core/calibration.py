"""Running calibration batches through the base model for data-dependent initialisers.

A method with ``needs_calibration`` returns a statistic per site from ``new_statistic``; every
forward call of that site's module hands the statistic its input ``x`` and, when the batch carries
an attention mask of matching shape, a boolean mask of the real (non-padding) tokens.

Causal LMs are asked for the last position's logits only (``logits_to_keep=1``) unless the output
head is itself calibrated: full logits over a large vocabulary (Gemma's 262k) are gigabytes per batch
that no statistic reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .method import LayerMethod, Site
from .targets import role_of


def collect(model: nn.Module, config: LayerMethod, paths: list[str], batches: Iterable[Any]) -> dict[str, Any]:
    statistics = {p: config.new_statistic(Site(p, model.get_submodule(p), role_of(model, p))) for p in paths}
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(stat):
        def hook(module, args):
            x = args[0]
            mask = current_mask[0]
            stat.update(x, mask if mask is not None and mask.shape == x.shape[:-1] else None)
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(make_hook(s)) for p, s in statistics.items()]
    was_training = model.training
    model.eval()
    extra = _last_logits_only(model, paths)
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                seen += 1
                if isinstance(batch, dict):
                    mask = batch.get("attention_mask")
                    current_mask[0] = None if mask is None else mask.bool()
                    model(**{**extra, **batch})  # a batch that sets logits_to_keep itself keeps it
                else:
                    current_mask[0] = None
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ConfigError(f"{config.name}: calibration data is empty")
    return statistics


def _last_logits_only(model: nn.Module, paths: list[str]) -> dict[str, int]:
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_calibrated = head is not None and any(model.get_submodule(p) is head for p in paths)
    return {"logits_to_keep": 1} if accepts and not head_calibrated else {}
