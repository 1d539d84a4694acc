"""TriAdaptLoRA: triangular core, importance-driven rank growth inside preallocated factors."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core import api
from peftlab.core.method import TrainingStep
from peftlab.methods.triadaptlora import importance_scores, orthogonality, rank_pattern

from ..conftest import assert_same_function, made_by_fold, make_inputs, output_of, tiny_llama

CASES = {"triadaptlora": {"reference_rank": 2, "init_rank": 2, "incre_rank_num": 2, "max_rank": 6}}
VARIANTS = [("triadaptlora", {"reference_rank": 4, "rank_growth": "non-linear", "rank_scaled": True,
                              "orth_reg_weight": 0.0, "dropout": 0.1})]

SMALL = {"reference_rank": 2, "init_rank": 1, "incre_rank_num": 1, "max_rank": 3}


def _step(model, s, total):
    api.on_step(model, TrainingStep(s, total, 1e-3, 1e-3))


def _randomise_b(adapters, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)


def test_core_is_block_lower_plus_block_upper():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", reference_rank=4, init_rank=1, incre_rank_num=2, max_rank=5)
    adapter = next(iter(api.attached_adapters(model, "default").values()))
    # blocks: [0] [1 2] [3 4]
    assert adapter.block_of.tolist() == [0, 1, 1, 2, 2]
    low, up = adapter.lower_mask.bool(), adapter.upper_mask.bool()
    assert low[2, 1] and low[1, 2] and not low[0, 1] and low[3, 0]  # diagonal blocks are in both parts
    assert up[0, 4] and not up[3, 1] and (low | up).all() and (low & up).sum() == 1 + 4 + 4
    assert torch.equal(adapter.core()[:1, :1], 2 * torch.eye(1))  # C starts at L00 + U00 = 2 I
    assert adapter.core()[1:].abs().sum() == 0  # inactive blocks are masked


def test_growth_follows_importance_and_keeps_shapes_and_outputs():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", target_total_rank=30, **SMALL)
    adapters = api.attached_adapters(model, "default")
    _randomise_b(adapters)
    paths = list(adapters)
    boosted = {paths[3]: 4.0, paths[7]: 3.0, paths[0]: 2.0, paths[12]: 1.0, paths[5]: 0.5}
    with torch.no_grad():
        for p, extra in boosted.items():
            adapters[p].lower[0, 0] += extra  # ‖C‖ grew: these layers are important
    shapes = {n: (id(p), p.shape) for n, p in model.named_parameters() if p.requires_grad}
    inputs = make_inputs("llama")
    with torch.no_grad():
        before = output_of(model, inputs)
    assert sum(rank_pattern(model).values()) == 14
    # total 14, budget 30: (30 - 14) * (4 / 16) = 4 layers grow, the four most important ones
    _step(model, 4, 16)
    grown = {p for p, r in rank_pattern(model).items() if r == 2}
    assert grown == set(list(boosted)[:4])
    assert sum(rank_pattern(model).values()) == 18
    assert shapes == {n: (id(p), p.shape) for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), before, atol=1e-6)  # growth is function-preserving
    # the new block trains from now on
    model.train()
    output_of(model, inputs).pow(2).mean().backward()
    for p, a in adapters.items():
        assert (a.lora_B.grad[:, 1].abs().sum() > 0) == (p in grown)
        assert a.lora_B.grad[:, 2:].abs().sum() == 0


def test_warmup_interval_cap_and_budget():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", init_warmup=2, incre_interval=3, **SMALL)  # budget 28
    for s in range(3):  # steps 0..2: warm-up (growth needs step > init_warmup)
        _step(model, s, 100)
    assert set(rank_pattern(model).values()) == {1}
    _step(model, 4, 100)  # not a multiple of incre_interval
    assert set(rank_pattern(model).values()) == {1}
    _step(model, 3, 100)
    assert sum(rank_pattern(model).values()) > 14
    for s in range(6, 400, 3):
        _step(model, s, 100)
    ranks = rank_pattern(model)
    assert max(ranks.values()) <= 3 and sum(ranks.values()) >= 28  # capped per layer; stops at the budget
    assert sum(ranks.values()) < 28 + 14


def test_scores_are_the_change_of_the_normalised_frobenius_norm():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", **SMALL)
    adapter = next(iter(api.attached_adapters(model, "default").values()))
    assert torch.isclose(adapter.previous_norm, torch.tensor(2.0))  # ‖2·I_1‖ / 1 block
    with torch.no_grad():
        adapter.upper[0, 0] = 2.0  # C00 = 1 + 2
    assert importance_scores([adapter]) == pytest.approx([1.0])
    assert importance_scores([adapter]) == pytest.approx([0.0])


def _grown_with_random_factors(seed=3):
    """Layers of every projection shape at different ranks, with random factors and cores."""
    model = peftlab.adapt(tiny_llama(), "triadaptlora", reference_rank=4, init_rank=1, incre_rank_num=2, max_rank=5)
    adapters = api.attached_adapters(model, "default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, a in enumerate(adapters.values()):
            for p in (a.lora_A, a.lora_B, a.lower, a.upper):
                p.copy_(torch.randn(p.shape, generator=gen))
            a.active_rank.fill_((1, 3, 5)[index % 3])
    return model, adapters


def _layer_norm_change(a):
    """The spec's score for one layer: ‖C_active‖_F / #active blocks, minus the remembered value."""
    rank = int(a.active_rank)
    return (torch.linalg.norm(a.core()) / (int(a.block_of[rank - 1]) + 1) - a.previous_norm).item()


def _layer_orthogonality(a):
    rank = int(a.active_rank)
    a_active, b_active = a.lora_A[:rank], a.lora_B[:, :rank]
    eye = torch.eye(rank)
    return torch.linalg.norm(a_active @ a_active.T - eye) + torch.linalg.norm(b_active.T @ b_active - eye)


def test_batched_scores_and_regulariser_equal_the_per_layer_formulas():
    model, adapters = _grown_with_random_factors()
    layers = list(adapters.values())
    expected = [_layer_norm_change(a) for a in layers]
    assert importance_scores(layers) == pytest.approx(expected, rel=1e-5)
    assert importance_scores(layers) == pytest.approx([0.0] * len(layers), abs=1e-5)  # values remembered

    batched = orthogonality(layers)
    reference = torch.stack([_layer_orthogonality(a) for a in layers])
    assert torch.allclose(batched, reference, rtol=1e-5)
    params = [p for a in layers for p in (a.lora_A, a.lora_B)]
    got = torch.autograd.grad(batched.sum(), params)
    want = torch.autograd.grad(reference.sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def _hook_ops(layers: int) -> int:
    """ATen ops (views excluded) of one growth round and the regulariser's forward and backward, on a
    tiny Llama with ``layers`` blocks where exactly one layer grows."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = peftlab.adapt(LlamaForCausalLM(config), "triadaptlora", target_total_rank=7 * layers + 1, **SMALL)
    adapters = api.attached_adapters(model, "default")
    _randomise_b(adapters)
    with torch.no_grad():
        next(iter(adapters.values())).lower[0, 0] += 1  # the one layer whose score is highest
    rank_pattern(model)  # the host reads each rank once, then again only after it changes
    with Count():
        _step(model, 1, 10)
        peftlab.regularization(model).backward()
    assert sum(rank_pattern(model).values()) == 7 * layers + 1
    return Count.ops


def test_hooks_dispatch_a_number_of_ops_independent_of_the_layer_count():
    # Per-layer bookkeeping would be hundreds of kernel launches (and host reads) a step on a 1B model.
    small, large = _hook_ops(1), _hook_ops(4)
    assert large == small, (small, large)


def test_the_host_reads_ranks_again_only_after_they_change():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", **SMALL)
    adapter = next(iter(api.attached_adapters(model, "default").values()))
    assert adapter.rank() == 1
    with torch.no_grad():
        adapter.active_rank.fill_(2)  # as load_state_dict writes it
    assert adapter.rank() == 2
    adapter.grow(torch.Generator().manual_seed(0))
    assert adapter.rank() == 3 == int(adapter.active_rank)


def test_grown_ranks_survive_save_and_load(tmp_path):
    model = peftlab.adapt(tiny_llama(), "triadaptlora", **SMALL)
    adapters = api.attached_adapters(model, "default")
    with torch.no_grad():
        next(iter(adapters.values())).lower[0, 0] += 1
    _step(model, 1, 10)
    _randomise_b(adapters, seed=2)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_llama(), tmp_path / "a")
    assert rank_pattern(fresh) == rank_pattern(model)
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-6)


def test_orthogonality_regulariser_on_active_factors():
    model = peftlab.adapt(tiny_llama(), "triadaptlora", **SMALL)
    adapters = api.attached_adapters(model, "default")
    reg = peftlab.regularization(model)
    a = next(iter(adapters.values()))
    row = a.lora_A[0].detach()
    expected_first = abs(row @ row - 1) + 1.0  # ‖A Aᵀ − I‖ (rank 1) + ‖Bᵀ B − I‖ with B = 0
    assert reg is not None and reg.item() > 0
    assert orthogonality([a])[0].item() == pytest.approx(expected_first.item(), rel=1e-5)
    model2 = peftlab.adapt(tiny_llama(), "triadaptlora", orth_reg_weight=0.0, **SMALL)
    assert peftlab.regularization(model2) is None


def test_config_errors():
    for bad in ({"reference_rank": 0}, {"max_rank": 4, "init_rank": 1, "incre_rank_num": 2},
                {"rank_growth": "cubic"}, {"incre_interval": 0}, {"orth_reg_weight": -1.0}):
        with pytest.raises(peftlab.ConfigError):
            peftlab.TriAdaptLoRA(**bad)


def test_trainable_count_on_llama_7b_shapes():
    config = peftlab.TriAdaptLoRA()  # reference 8, init 1, blocks of 4 -> max_rank 17
    assert config.max_rank_value == 17
    assert config.trainable_count(4096, 4096) == 17 * 8192 + 2 * 17 * 17 == 139_842
    per_layer = 4 * config.trainable_count(4096, 4096) + 3 * config.trainable_count(4096, 11008)
    assert per_layer * 32 == 42_604_992


class _OneLinear(torch.nn.Module):
    def __init__(self, fan_in=12, fan_out=10):
        super().__init__()
        self.proj = torch.nn.Linear(fan_in, fan_out)

    def forward(self, x):
        return self.proj(x)


def _reference(adapter, layer, x):
    """y = W0 x + b + s·B_m C A_m x, C = (L ⊙ lower + U ⊙ upper) on the active blocks, from scratch (float64)."""
    rank, size = int(adapter.active_rank), adapter.lora_A.shape[0]
    blocks = [0 if i < adapter.init_rank else 1 + (i - adapter.init_rank) // adapter.block_size for i in range(size)]
    lower = torch.tensor([[float(blocks[j] <= blocks[i]) for j in range(size)] for i in range(size)],
                         dtype=torch.float64)
    active = torch.tensor([float(i < rank) for i in range(size)], dtype=torch.float64)
    params = {n: p.detach().double().requires_grad_() for n, p in
              (("A", adapter.lora_A), ("B", adapter.lora_B), ("L", adapter.lower), ("U", adapter.upper))}
    core = (params["L"] * lower + params["U"] * lower.T) * torch.outer(active, active)
    scale = adapter.alpha / rank if adapter.rank_scaled else adapter.alpha
    delta = scale * (params["B"] * active) @ core @ (params["A"] * active[:, None])
    return torch.nn.functional.linear(x, layer.weight.double() + delta, layer.bias.double()), params


@pytest.mark.parametrize("rank_scaled", [False, True])
def test_forward_and_gradients_match_the_reference_formula(rank_scaled):
    torch.manual_seed(0)
    model = peftlab.adapt(_OneLinear(), "triadaptlora", reference_rank=2, init_rank=1, incre_rank_num=2,
                          max_rank=7, rank_scaled=rank_scaled, alpha=3.0).double()
    adapter = api.attached_adapters(model, "default")["proj"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every entry non-zero, also outside the triangles and the active blocks
        for p in (adapter.lora_A, adapter.lora_B, adapter.lower, adapter.upper):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.train()

    def check(*inputs):
        for x in inputs:
            check_one(x)

    def check_one(x):
        x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, ref = _reference(adapter, model.proj, x_ref)
        out = model(x_got)
        assert made_by_fold(out) == (x.shape[1] == 8)  # 32 tokens fold into W, 10 do not (12·10 / 22·2)
        params = (adapter.lora_A, adapter.lora_B, adapter.lower, adapter.upper)
        assert_same_function(out, expected, [(x_got, x_ref), *zip(params, ref.values(), strict=True)], gen)
        rank = adapter.rank()  # inactive rows/columns and the entries outside the triangles get no gradient
        assert adapter.lora_A.grad[rank:].abs().sum() == 0 and adapter.lora_B.grad[:, rank:].abs().sum() == 0
        assert (adapter.lower.grad * (1 - adapter.lower_mask)).abs().sum() == 0
        assert (adapter.upper.grad * (1 - adapter.upper_mask)).abs().sum() == 0
        model.zero_grad()

    inputs = [torch.randn(batch, tokens, 12, generator=gen, dtype=torch.float64) for batch, tokens in ((2, 5), (4, 8))]
    check(*inputs)
    adapter.grow(torch.Generator().manual_seed(3))  # the cached masks (and s with rank_scaled) follow the rank
    assert adapter.rank() == 3
    check(*inputs)
    saved = {k: v.clone() for k, v in adapter.state_dict().items()}  # at rank 3, loaded back at rank 5
    adapter.grow(torch.Generator().manual_seed(4))
    check(*inputs)
    adapter.load_state_dict(saved)
    assert adapter.rank() == 3
    check(*inputs)


def test_ranks_read_under_inference_mode():
    with torch.inference_mode():
        model = peftlab.adapt(tiny_llama(), "triadaptlora", **SMALL)
        assert set(rank_pattern(model).values()) == {1}
