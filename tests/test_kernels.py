"""Fast paths against their plain-PyTorch definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.kernels.cross_entropy import fused_linear_cross_entropy


@pytest.mark.parametrize("divisor, softcap", [(None, None), (None, 3.0), (2.0, None)])
def test_fused_linear_cross_entropy_matches_autograd(divisor, softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,), generator=gen)
    logits = hidden @ weight.T
    if divisor:
        logits = logits / divisor
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference * 0.7, hidden)
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk=8, divisor=divisor, softcap=softcap)
    (got,) = torch.autograd.grad(fused * 0.7, hidden)
    assert torch.allclose(fused, reference, rtol=1e-9)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)
