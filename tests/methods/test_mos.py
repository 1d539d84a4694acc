"""MoS: shard pools shared across layers (stored once), subset selection, pair dissociation,
vector sharding and shard privatisation."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core import api, files
from peftlab.methods.mos import pool_of

from ..conftest import make_inputs, output_of, tiny_llama

OPTIONS = {"r": 4, "equivalent_rank": 3, "private_rank": 1, "shards_per_vector": 2}
CASES = {"mos": dict(OPTIONS)}
VARIANTS = [
    ("mos", {"r": 3, "equivalent_rank": 2, "private_rank": 1, "shards_per_vector": 1, "pair_dissociation": False}),
    ("mos", {"r": 2, "equivalent_rank": 2, "private_rank": 2, "shards_per_vector": 4, "dropout": 0.0}),
]


def _model(**options):
    return peftlab.adapt(tiny_llama(), "mos", **{**OPTIONS, "dropout": 0.0, **options})


def _by_kind(model):
    adapters = api.attached_adapters(model, "default")
    kinds = {}
    for path, adapter in adapters.items():
        kinds.setdefault(path.rsplit(".", 1)[-1], []).append((path, adapter))
    return kinds


def test_pools_are_stored_once_and_counted_once(tmp_path):
    model = _model()
    kinds = _by_kind(model)
    assert len(kinds) == 7 and all(len(v) == 2 for v in kinds.values())
    pools = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(pools) == 14 and all(".layers.0." in n for n, _ in pools)  # owners: the first layer's adapters
    for _, ((_, owner), (_, member)) in kinds.items():
        assert owner.is_owner and not member.is_owner and member.owner is owner
        assert list(member.parameters()) == []  # the second layer holds no copy
        assert set(member.state_dict()) == {"index_A", "index_B"}
        assert pool_of(member)[0] is owner.pool_A
    # pool size: e·L·l shards of in/l (A) and out/l (B)
    _, q = kinds["q_proj"][0]
    assert q.pool_A.shape == (3 * 2 * 2, 16) and q.pool_B.shape == (12, 16)
    _, k = kinds["k_proj"][0]
    assert k.pool_B.shape == (12, 8)  # kv projection 32 -> 16
    # trainable count = e·(in + out) summed over layers, each pool counted once
    expected = sum(3 * (m.in_features + m.out_features) for m in (model.get_submodule(p) for p in
                                                                  api.attached_adapters(model, "default")))
    assert peftlab.trainable_parameter_count(model) == expected
    # the saved file holds each pool once
    state = files.adapter_state(model, "default")
    assert sum(1 for key in state if key.endswith(("pool_A", "pool_B"))) == 14
    assert sum(1 for key in state if key.endswith("index_A")) == 14
    # optimizer sees each pool once
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 14


def test_layers_assemble_their_factors_from_the_shared_pool():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    (_, owner), (path1, member) = _by_kind(model)["q_proj"]
    a, b = member.factors()
    for j in range(4):  # vector sharding: row j = concatenation of its l = 2 shards
        assert torch.equal(a[j], torch.cat([owner.pool_A[member.index_A[j, 0]], owner.pool_A[member.index_A[j, 1]]]))
        assert torch.equal(b[:, j], torch.cat([owner.pool_B[member.index_B[j, 0]],
                                               owner.pool_B[member.index_B[j, 1]]]))
    layer = model.get_submodule(path1)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight) + (x @ a.T @ b.T) * member.scale,
                              atol=1e-5)
    # a loss through the second layer only trains the shards that layer reads, in the owner's pool
    owner.pool_A.grad = None
    layer(x).pow(2).sum().backward()
    touched = (owner.pool_A.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert sorted(touched) == sorted(set(member.index_A.flatten().tolist()))


def test_subset_selection_dissociation_and_privatisation():
    model = _model(r=4, equivalent_rank=3, private_rank=1, shards_per_vector=2)
    layers, shards, e, p, r = 2, 2, 3, 1, 4
    public = (e - p) * layers * shards  # 8 public shards, 4 private (2 per layer)
    for members in _by_kind(model).values():
        privates = []
        for k, (_, adapter) in enumerate(members):
            for index in (adapter.index_A, adapter.index_B):
                shared, private = index[: r - p].flatten(), index[r - p:].flatten()
                assert (shared < public).all() and len(set(shared.tolist())) == len(shared)  # a subset, no repeats
                assert private.tolist() == list(range(public + k * p * shards, public + (k + 1) * p * shards))
            privates.append(set(adapter.index_A[r - p:].flatten().tolist()))
            assert not torch.equal(adapter.index_A[: r - p], adapter.index_B[: r - p])  # pair dissociation
        assert not privates[0] & privates[1]  # private shards are not shared between layers
    tied = _model(pair_dissociation=False)
    assert all(torch.equal(a.index_A, a.index_B) for a in api.attached_adapters(tied, "default").values())
    # indices are a function of the seed
    again = _model()
    assert all(torch.equal(a.index_A, b.index_A) for a, b in zip(api.attached_adapters(model, "default").values(),
                                                                  api.attached_adapters(again, "default").values()))


def test_private_shards_only_train_from_their_layer():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    (path0, owner), (path1, member) = _by_kind(model)["up_proj"]
    model.get_submodule(path1)(torch.randn(2, 32)).sum().backward()
    grads = owner.pool_B.grad.abs().sum(1)
    assert grads[member.index_B[-1]].sum() > 0  # its own private shards
    assert grads[owner.index_B[-1]].sum() == 0  # the first layer's private shards


def test_one_config_object_for_two_models_builds_two_pools():
    config = peftlab.MoS(**OPTIONS)
    first = peftlab.adapt(tiny_llama(), config)
    second = peftlab.adapt(tiny_llama(1), config)
    a1 = next(iter(api.attached_adapters(first, "default").values()))
    a2 = next(iter(api.attached_adapters(second, "default").values()))
    assert a1.pool_A is not a2.pool_A and a1.pool_A.shape == a2.pool_A.shape == (12, 16)
    assert peftlab.trainable_parameter_count(first) == peftlab.trainable_parameter_count(second)
    peftlab.adapt(first, config, name="again")  # same config, same model, second attachment: its own pools
    b1 = next(iter(api.attached_adapters(first, "again").values()))
    assert b1.pool_A is not a1.pool_A and b1.pool_A.shape == (12, 16)


def test_a_too_small_public_pool_is_reported_and_dims_must_split():
    model = _model(r=8, equivalent_rank=2, private_rank=1)  # needs 7 public vectors, the pool has 1 x 2
    with pytest.raises(peftlab.ConfigError, match="public pool"):
        output_of(model, make_inputs("llama"))
    with pytest.raises(peftlab.ConfigError, match="shards_per_vector"):
        _model(shards_per_vector=5)


def test_config_errors():
    for bad in ({"r": 0}, {"private_rank": 5}, {"equivalent_rank": 2, "private_rank": 2, "r": 4},
                {"shards_per_vector": 0}, {"dropout": 1.0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.MoS(**bad)


def test_trainable_count_on_llama_7b_shapes():
    config = peftlab.MoS()  # r 16, e 4, p 2, l 4 (official launch.json)
    assert config.trainable_count(4096, 4096) == 32_768
    per_layer = 4 * config.trainable_count(4096, 4096) + 3 * config.trainable_count(4096, 11008)
    assert per_layer * 32 == 9_994_240  # model_param_summary.txt of the official repo (equivalent rank 4)
    assert peftlab.LoRA(r=16).trainable_count(4096, 4096) * 4 + 3 * peftlab.LoRA(r=16).trainable_count(4096, 11008) \
        == 4 * per_layer  # MoS with r 16 costs a quarter of LoRA r 16 (e = 4)
