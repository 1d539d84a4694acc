"""Calibration passes: what the statistics see, and that a causal LM skips the full logits."""

from types import SimpleNamespace

import torch

from peftlab.core.calibration import collect

from .conftest import tiny_llama


class CountTokens:
    def __init__(self):
        self.tokens = 0

    def update(self, x, mask):
        self.tokens += int(mask.sum()) if mask is not None else x.shape[:-1].numel()


def _collect(model, paths):
    config = SimpleNamespace(name="probe", new_statistic=lambda site: CountTokens())
    batch = {"input_ids": torch.randint(0, 100, (2, 7)),
             "attention_mask": torch.tensor([[1] * 7, [0, 0] + [1] * 5])}
    logits_shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: logits_shapes.append(tuple(out.shape)))
    try:
        return collect(model, config, paths, [batch]), logits_shapes
    finally:
        hook.remove()


def test_causal_lm_calibration_computes_only_the_last_logits():
    model = tiny_llama()
    stats, logits_shapes = _collect(model, ["model.layers.0.self_attn.q_proj"])
    assert stats["model.layers.0.self_attn.q_proj"].tokens == 12  # every real token reaches the layer
    assert logits_shapes == [(2, 1, model.config.vocab_size)]


def test_calibrated_output_head_sees_every_position():
    model = tiny_llama()
    stats, logits_shapes = _collect(model, ["lm_head"])
    assert stats["lm_head"].tokens == 12
    assert logits_shapes == [(2, 7, model.config.vocab_size)]
