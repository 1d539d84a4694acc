"""RandLoRA: learned diagonal scalings of fixed random bases (arXiv 2502.00987; parity with HF PEFT 0.21.2)."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from peftlab.core.inject import folds_into, hosts
from peftlab.methods.randlora import peft_basis_dims

from ..conftest import (
    assert_close_fp64,
    backward_through,
    dense_reference,
    make_inputs,
    output_of,
    stack_under_lora,
    tiny_gpt2,
    tiny_llama,
)

CASES = {"randlora": {"r": 4, "alpha": 80.0}}
VARIANTS = [
    ("randlora", {"r": 4, "alpha": 80.0, "basis": "sparse", "forward": "dense"}),
    ("randlora", {"r": 8, "alpha": 16.0, "basis": "very_sparse", "scale_by_bases": True, "seed": 5}),
]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapters_of(model, name="default"):
    return [(path, module, slot[name]) for path, module, slot in hosts(model) if name in slot]


def peft_randlora(targets, **options):
    from peft import RandLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), RandLoraConfig(target_modules=targets, **options))


def copy_random_scalings(peft_model, ours, seed=0):
    """Give PEFT's and peftlab's λ, γ the same random values (so that the adapters are far from zero)."""
    gen = torch.Generator().manual_seed(seed)
    for path, _, adapter in adapters_of(ours):
        theirs = peft_model.base_model.model.get_submodule(path)
        lam = torch.randn(adapter.randlora_lambda.shape, generator=gen)
        gamma = torch.randn(adapter.randlora_gamma.shape, generator=gen) / 8
        with torch.no_grad():
            for target, value in ((adapter.randlora_lambda, lam), (theirs.randlora_lambda["default"], lam),
                                  (adapter.randlora_gamma, gamma), (theirs.randlora_gamma["default"], gamma)):
                assert target.shape == value.shape
                target.copy_(value)


@pytest.mark.parametrize("basis", ["dense", "sparse", "very_sparse"])
def test_equals_hf_peft_randlora_on_tiny_llama(basis):
    flags = {"sparse": basis == "sparse", "very_sparse": basis == "very_sparse"}
    peft_model = peft_randlora(LLAMA_TARGETS, r=4, randlora_alpha=80, projection_prng_key=7, **flags)
    ours = tiny_llama()
    paths = [p for p, _ in ours.named_modules() if p.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    dims = peft_basis_dims(ours, paths)
    assert dims == (48, 48)
    peftlab.adapt(ours, "randlora", r=4, alpha=80.0, seed=7, basis=basis, basis_dims=dims, targets=LLAMA_TARGETS)
    bases = adapters_of(ours)[0][2].bases
    assert torch.equal(bases.a, peft_model.base_model.randlora_A["default"])  # generated the same way
    assert torch.equal(bases.b, peft_model.base_model.randlora_B["default"])
    inputs = make_inputs("llama")
    with torch.no_grad():
        assert torch.allclose(output_of(ours, inputs), output_of(peft_model, inputs), atol=1e-6)  # both at init
    copy_random_scalings(peft_model, ours)
    for path, module, adapter in adapters_of(ours):
        peft_layer = peft_model.base_model.model.get_submodule(path)
        assert torch.allclose(adapter.delta_weight(module), peft_layer.get_delta_weight("default"), atol=1e-6)
    # Such large updates amplify fp32 rounding (PEFT's own sparse-basis logits are 6e-5 from their fp64 values),
    # and peftlab sums in another order: compare in fp64.
    peft_model.double(), ours.double()
    with torch.no_grad():
        with peftlab.disabled(ours):
            base = output_of(ours, inputs)
        theirs, mine = output_of(peft_model, inputs), output_of(ours, inputs)
    assert not torch.allclose(mine, base, atol=1e-2)
    assert torch.allclose(mine, theirs, atol=1e-10)


def test_per_shape_bases_equal_peft_when_targets_share_a_shape():
    peft_model = peft_randlora(["q_proj", "o_proj"], r=4, randlora_alpha=80, projection_prng_key=3)
    ours = peftlab.adapt(tiny_llama(), "randlora", r=4, alpha=80.0, seed=3, targets=["q_proj", "o_proj"])
    copy_random_scalings(peft_model, ours, seed=1)
    inputs = make_inputs("llama")
    with torch.no_grad():
        assert torch.allclose(output_of(ours, inputs), output_of(peft_model, inputs), atol=1e-5)


def test_bases_are_shared_regenerated_and_never_touch_the_global_rng():
    state = torch.random.get_rng_state()
    model = peftlab.adapt(tiny_llama(), "randlora", r=4, alpha=80.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    by_shape = {}
    for _, module, adapter in adapters_of(model):
        shape = (max(module.in_features, module.out_features), min(module.in_features, module.out_features))
        by_shape.setdefault(shape, adapter.bases)
        assert adapter.bases is by_shape[shape]  # one buffer module per shape
        assert set(adapter.state_dict()) == {"randlora_lambda", "randlora_gamma"}  # bases are not saved
    other = peftlab.adapt(tiny_llama(), "randlora", r=4, alpha=80.0)
    assert torch.equal(adapters_of(other)[0][2].bases.a, adapters_of(model)[0][2].bases.a)


def test_factored_and_dense_paths_agree_and_the_update_is_full_rank():
    models = [peftlab.adapt(tiny_llama(), "randlora", r=4, alpha=80.0, forward=f) for f in ("factored", "dense")]
    gen = torch.Generator().manual_seed(0)
    for (_, la, a), (_, lb, b) in zip(adapters_of(models[0]), adapters_of(models[1])):
        lam = torch.randn(a.randlora_lambda.shape, generator=gen)
        gamma = torch.randn(a.randlora_gamma.shape, generator=gen)
        with torch.no_grad():
            for adapter in (a, b):
                adapter.randlora_lambda.copy_(lam)
                adapter.randlora_gamma.copy_(gamma)
        x = torch.randn(2, 3, a.fan_in, generator=gen)
        with torch.no_grad():
            ya, yb = la(x), lb(x)
        assert (ya - yb).abs().max() <= 1e-5 * ya.abs().max()
        assert torch.linalg.matrix_rank(a.delta_weight(la)) == min(a.fan_in, a.fan_out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d-bias"])
@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stacked"])
@pytest.mark.parametrize("forward", ["auto", "factored", "dense"])
def test_training_paths_are_the_dense_formula_with_gradients(forward, stacked, make):
    """Output and the gradients of x, λ and γ equal those of (W + ΔW) x + b with ΔW = s·B_flat Â written out in
    fp64 (Â row k·n + b = λ_kb · A_k ⊙ γ_b), on every path: ΔW folded into W's product (alone on a plain
    layer), added to base(x) (under another adapter), or the two factors applied to x."""
    model = peftlab.adapt(make(), "randlora", r=4, alpha=80.0, forward=forward)
    if stacked:
        stack_under_lora(model)
    gen = torch.Generator().manual_seed(0)
    for _, layer, adapter in adapters_of(model):
        with torch.no_grad():
            adapter.randlora_lambda.copy_(torch.randn(adapter.randlora_lambda.shape, generator=gen))
            adapter.randlora_gamma.copy_(torch.randn(adapter.randlora_gamma.shape, generator=gen))
        assert folds_into(layer) is not stacked
        x, probe, y = backward_through(layer, adapter.fan_in, adapter.fan_out, gen)

        lam = adapter.randlora_lambda.detach().double().requires_grad_()
        gamma = adapter.randlora_gamma.detach().double().requires_grad_()
        a = adapter.bases.a[:, 0, : adapter.min_dim].double()  # r x m
        b = adapter.bases.b[: adapter.max_dim, : adapter.n].double().flatten(1)  # M x n·r
        scaled = torch.einsum("kb,kj,bj->kbj", lam, a, gamma).flatten(end_dim=1)  # r·n x m
        delta = adapter.scale * (b @ scaled)  # M x m
        delta = delta if adapter.fan_in == adapter.min_dim else delta.T
        expected, x64 = dense_reference(layer, x, probe, delta)
        assert_close_fp64(y, expected)
        assert_close_fp64(x.grad, x64.grad)
        assert_close_fp64(adapter.randlora_lambda.grad, lam.grad)
        assert_close_fp64(adapter.randlora_gamma.grad, gamma.grad)


def test_counts_on_llama_2_7b():
    config = peftlab.RandLoRA()  # r 32: 128 bases of rank 32 cover 4096
    assert config.trainable_count(4096, 4096) == 128 * (32 + 4096) == 528_384
    assert config.trainable_count(4096, 11008) == config.trainable_count(11008, 4096) == 528_384
    assert 7 * 32 * 528_384 == 118_358_016
    assert peftlab.RandLoRA(r=30).trainable_count(4096, 4096) == 137 * (30 + 4096)
    with pytest.raises(peftlab.ConfigError, match="basis_dims"):
        peftlab.adapt(tiny_llama(), "randlora", r=4, basis_dims=(32, 32))  # smaller than gate/up (48)
    with pytest.raises(peftlab.ConfigError, match="basis"):
        peftlab.RandLoRA(basis="gaussian")
