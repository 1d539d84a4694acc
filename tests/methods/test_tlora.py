"""TLoRA: tensor-ring-matrix transform of W0 plus a compact residual (arXiv 2501.08727; see tlora.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.layers import weight_matrix
from peftlab.methods.tlora import factorize, ring_matrix, tensor_shape, tlora_dense_weight

from ..conftest import tiny_gpt2, tiny_llama

CASES = {"tlora": {"r": 2}}
VARIANTS = [
    ("tlora", {"r": 2, "transform_rank": 2, "residual": "tr"}),
    ("tlora", {"r": 2, "transform_rank": 0}),
    ("tlora", {"r": 2, "transform_reg": 0.1}),
]


def adapters_of(model, name="default"):
    return [(module, slot[name]) for _, module, slot in hosts(model) if name in slot]


def randomise(model, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def explicit_ring(cores: list[torch.Tensor], rows: list[int], cols: list[int]) -> torch.Tensor:
    """T[(i_1..i_D), (j_1..j_D)] = tr(A¹[i_1, j_1] ⋯ A^D[i_D, j_D]), big-endian indices, entry by entry."""
    out = torch.zeros(math.prod(rows), math.prod(cols), dtype=torch.float64)
    for i in itertools.product(*map(range, rows)):
        for j in itertools.product(*map(range, cols)):
            m = torch.eye(cores[0].shape[-2], dtype=torch.float64)
            for d, core in enumerate(cores):
                m = m @ core[i[d], j[d]].double()
            out[sum(i[d] * math.prod(rows[d + 1:]) for d in range(len(rows))),
                sum(j[d] * math.prod(cols[d + 1:]) for d in range(len(cols)))] = torch.trace(m)
    return out


def test_tensor_ring_matrix_and_its_identity_init():
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(a, b, 2, 2, generator=gen, dtype=torch.float64) for a, b in ((2, 3), (3, 2), (2, 2))]
    assert torch.allclose(ring_matrix(cores), explicit_ring(cores, [2, 3, 2], [3, 2, 2]), atol=1e-10)
    kron = [torch.randn(s, s, 1, 1, generator=gen, dtype=torch.float64) for s in (2, 3, 4)]
    expected = torch.kron(torch.kron(kron[0][..., 0, 0], kron[1][..., 0, 0]), kron[2][..., 0, 0])
    assert torch.allclose(ring_matrix(kron), expected, atol=1e-12)  # rank 1 = the code's seq_kronecker
    model = peftlab.adapt(tiny_llama(), "tlora", transform_rank=3)
    for _, adapter in adapters_of(model):
        assert torch.allclose(adapter.transform_matrix(), torch.eye(adapter.fan_in), atol=1e-6)  # Prop. 1


@pytest.mark.parametrize("options", [{}, {"transform_rank": 2, "residual": "tr", "r": 2}])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forward_equals_the_codes_dense_weight(options, make):
    model = peftlab.adapt(make(), "tlora", **options)
    randomise(model)
    for layer, adapter in adapters_of(model):
        x = torch.randn(2, 3, adapter.fan_in)
        dense = tlora_dense_weight(adapter, layer)  # W0 T + s·Δ, as the code builds it each forward
        assert torch.allclose(dense, weight_matrix(layer).detach() @ adapter.transform_matrix()
                              + adapter.scale * adapter.residual_matrix(), atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, dense, layer.bias), atol=1e-5)


def test_tensor_ring_residual_is_the_codes_ttv():
    model = peftlab.adapt(tiny_llama(), "tlora", residual="tr", r=2)
    randomise(model, scale=0.5)
    layer, adapter = adapters_of(model)[5]  # up_proj: 32 -> 48
    out_shape, in_shape = [c.shape[0] for c in adapter.out_cores], [c.shape[0] for c in adapter.in_cores]
    assert (tuple(out_shape), tuple(in_shape)) == ((3, 4, 4), (2, 4, 4))
    # Δ[(o), (j)] = tr(B¹[o1] B²[o2] B³[o3] C¹[j1] C²[j2] C³[j3]): one ring over output then input cores
    cores = [c[:, None] for c in adapter.out_cores] + [c[None, :] for c in adapter.in_cores]
    expected = explicit_ring(cores, out_shape + [1] * 3, [1] * 3 + in_shape)
    assert torch.allclose(adapter.residual_matrix().double(), expected, atol=1e-5)


def test_tr_residual_init_is_zero_and_uses_the_codes_scales():
    torch.manual_seed(0)
    model = peftlab.adapt(tiny_llama(), "tlora", residual="tr", r=4)
    _, adapter = adapters_of(model)[0]
    assert torch.count_nonzero(adapter.out_cores[0]) == 0 and torch.count_nonzero(adapter.residual_matrix()) == 0
    assert abs(adapter.in_cores[2].std().item() - 1 / math.sqrt(4)) < 0.1
    assert abs(adapter.out_cores[1].std().item() - math.sqrt(4) / 16) < 0.03


def test_identity_regulariser():
    model = peftlab.adapt(tiny_llama(), "tlora", transform_rank=2, transform_reg=0.5)
    assert peftlab.regularization(model).item() == 0.0
    _, adapter = adapters_of(model)[0]
    with torch.no_grad():
        adapter.transform[0][0, 1, 0, 1] += 3.0  # ‖A¹[:, :, 0, 1] − I/2‖_F becomes 3
    assert math.isclose(adapter.regularization().item(), 0.5 * 3.0, rel_tol=1e-6)
    assert peftlab.regularization(peftlab.adapt(tiny_llama(), "tlora")) is None


def test_tensorisation():
    assert tensor_shape(1280, 3, None) == (8, 10, 16)  # the code's table for SD widths
    assert tensor_shape(320, 3, None) == (4, 8, 10) and factorize(320, 3) == (5, 8, 8)
    assert factorize(4096, 3) == (16, 16, 16) and factorize(11008, 3) == (16, 16, 43)
    assert factorize(97, 3) == (1, 1, 97) and factorize(32, 3) == (2, 4, 4)
    assert tensor_shape(32, 3, {"32": [4, 8, 1]}) == (4, 8, 1)
    with pytest.raises(peftlab.ConfigError, match="multiply"):
        peftlab.TLoRA(tensor_shapes={"32": [4, 4]})


def test_counts_on_llama_2_7b():
    config = peftlab.TLoRA()  # r 1, Kronecker transform, LoRA residual
    q = config.trainable_count(4096, 4096)
    assert q == 3 * 16**2 + (4096 + 4096) == 8960
    up, down = config.trainable_count(4096, 11008), config.trainable_count(11008, 4096)
    assert down == 2 * 16**2 + 43**2 + 15104
    assert 32 * (4 * q + 2 * up + down) == 2_721_568 and 32 * 4 * q == 1_146_880
    tr = peftlab.TLoRA(r=6, transform_rank=2, residual="tr")
    assert tr.trainable_count(4096, 4096) == 4 * 768 + 36 * 96
