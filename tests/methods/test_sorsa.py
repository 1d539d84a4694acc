"""sorsa: trainable principal singular triplets, frozen residual, orthonormal regulariser after clipping."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.api import attached_adapters, before_optimizer_step
from peftlab.core.inject import hosts
from peftlab.core.method import TrainingStep
from peftlab.methods.sorsa import orthonormal_loss

from ..conftest import adapter_of, one_layer, perturb_adapters, rel_err, tiny_llama

CASES = {"sorsa": {"r": 4}}
VARIANTS = [
    ("sorsa", {"r": 4, "alpha": 8.0, "dropout": 0.1}),
    ("sorsa", {"r": 4, "orth_mode": "loss", "gamma": 1e-2}),
]





def test_init_equals_the_base_and_delta_is_zero():
    model = one_layer()
    x = torch.randn(5, 24)
    with torch.no_grad():
        base = model(x)
        peftlab.adapt(model, "sorsa", r=6)
        assert rel_err(model(x), base) <= 1e-5
    adapter = adapter_of(model)
    assert torch.count_nonzero(adapter.delta_weight(model[0])) == 0


def test_init_is_orthonormal_and_s_holds_the_top_singular_values():
    model = one_layer()
    sigma = torch.linalg.svdvals(model[0].weight.detach())
    adapter = adapter_of(peftlab.adapt(model, "sorsa", r=6))
    assert orthonormal_loss([adapter]).item() < 1e-5
    s = adapter.S.detach()
    assert torch.all(s[:-1] >= s[1:]) and torch.allclose(s, sigma[:6], rtol=1e-5)
    assert adapter.A.shape == (6, 24) and adapter.B.shape == (40, 6)


def test_residual_is_the_spectral_tail():
    model = one_layer()
    sigma = torch.linalg.svdvals(model[0].weight.detach())
    adapter = adapter_of(peftlab.adapt(model, "sorsa", r=6))
    residual = adapter.residual_weight(model[0])
    tail = torch.linalg.svdvals(residual)
    assert torch.allclose(tail[: 24 - 6], sigma[6:], atol=1e-5)
    assert tail[24 - 6:].abs().max() < 1e-5  # the top 6 are gone
    assert torch.allclose(torch.linalg.matrix_norm(residual, ord=2), sigma[6], atol=1e-5)


def test_trainable_tensors_and_count():
    model = peftlab.adapt(one_layer(), "sorsa", r=6)
    trainable = {n.rsplit(".", 1)[-1]: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"A": 6 * 24, "S": 6, "B": 40 * 6}
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert peftlab.trainable_parameter_count(model) == 6 * (24 + 40 + 1)
    method = peftlab.method_class("sorsa")()  # r = 128, the released script's rank
    assert method.trainable_count(4096, 4096) == 1_048_704
    # Llama-2-7B, all seven projections, 32 layers: the README's "320M"
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    assert 32 * sum(method.trainable_count(i, o) for i, o in shapes) == 319_844_352


def test_alpha_scales_the_update_and_the_residual_alike():
    model = one_layer()
    x = torch.randn(3, 24)
    weight = model[0].weight.detach().clone()
    adapter = adapter_of(peftlab.adapt(model, "sorsa", r=6, alpha=3.0))
    assert adapter.scale == 0.5
    with torch.no_grad():
        adapter.S.mul_(2.0)  # ΔW = c·B0 diag(S0) A0 at S = 2·S0
        principal = (adapter.base_B * adapter.base_S) @ adapter.base_A
        assert torch.allclose(adapter.delta_weight(model[0]), 0.5 * principal, atol=1e-6)
        assert torch.allclose(model(x), x @ (weight + 0.5 * principal).T + model[0].bias, atol=1e-5)


def _perturbed_model(seed=0):
    model = peftlab.adapt(tiny_llama(seed), "sorsa", r=4, gamma=4e-4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, slot in hosts(model):
            a = slot["default"]
            a.A.add_(0.1 * torch.randn(a.A.shape, generator=gen))
            a.B.add_(0.1 * torch.randn(a.B.shape, generator=gen))
    return model


def test_hook_adds_the_scaled_orthonormal_gradient_after_clipping():
    model = _perturbed_model()
    config = peftlab.adapters(model)["default"]
    adapters = attached_adapters(model, "default")
    ids = torch.randint(3, 128, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1e-3)  # a tiny clip: the hook's term must not be clipped
    clipped = {id(p): p.grad.clone() for p in params}
    step = TrainingStep(step=0, total_steps=10, lr=1e-5, peak_lr=3e-5, accumulation=4)
    before_optimizer_step(model, step)
    coefficient = 4e-4 / (3e-5 * 4)
    assert config.regularization(adapters) is None  # step mode: nothing is added to the loss
    first = next(iter(adapters.values()))
    assert torch.equal(first.S.grad, clipped[id(first.S)])  # S is not regularised
    added = (first.A.grad - clipped[id(first.A)]) / coefficient
    assert added.norm() > 10 * clipped[id(first.A)].norm()
    # finite differences of L_orth (mean over all 2N matrices) at two entries of A and one of B
    for tensor, index in ((first.A, (0, 3)), (first.A, (2, 17)), (first.B, (5, 1))):
        grad = (tensor.grad - clipped[id(tensor)])[index] / coefficient
        h = 1e-3
        with torch.no_grad():
            tensor[index] += h
            up = orthonormal_loss(adapters.values()).item()
            tensor[index] -= 2 * h
            down = orthonormal_loss(adapters.values()).item()
            tensor[index] += h
        assert abs((up - down) / (2 * h) - grad.item()) <= 2e-3 * max(1.0, abs(grad.item()))


def test_hook_coefficient_depends_on_peak_lr_and_accumulation():
    model = _perturbed_model()
    adapters = attached_adapters(model, "default")
    first = next(iter(adapters.values()))
    added = []
    for peak_lr, accumulation in ((3e-5, 1), (3e-5, 4), (6e-5, 1)):
        for p in model.parameters():
            p.grad = None
        before_optimizer_step(model, TrainingStep(0, 1, 0.0, peak_lr, accumulation))
        added.append(first.A.grad.clone())
    assert torch.allclose(added[1], added[0] / 4, rtol=1e-5)
    assert torch.allclose(added[2], added[0] / 2, rtol=1e-5)  # γ / peak lr, not the scheduled lr (0 here)


def test_loss_mode_adds_gamma_times_the_mean_orthonormality():
    model = peftlab.adapt(tiny_llama(), "sorsa", r=4, orth_mode="loss", gamma=0.5)
    adapters = attached_adapters(model, "default")
    with torch.no_grad():
        for a in adapters.values():
            a.A.mul_(2.0)  # ‖4I − I‖ = 3·√r for A; B stays orthonormal
    expected = 0.5 * (3 * 2.0 + 0.0) / 2  # mean over A and B of each layer
    assert abs(peftlab.regularization(model).item() - expected) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 even under autocast
        assert abs(peftlab.regularization(model).item() - expected) < 1e-4
    before = {id(p): None for p in model.parameters()}
    before_optimizer_step(model, TrainingStep(0, 1, 1e-3, 1e-3, 1))
    assert all(p.grad is None for p in model.parameters() if id(p) in before)


def reference_orthonormal_loss(adapters) -> torch.Tensor:
    """The spec's formula one layer at a time: (1/2N) Σ_layers (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)."""
    total = torch.zeros(())
    for a in adapters:
        eye = torch.eye(a.A.shape[0])
        total = total + torch.linalg.matrix_norm(a.A @ a.A.T - eye) + torch.linalg.matrix_norm(a.B.T @ a.B - eye)
    return total / (2 * len(adapters))


def factors(adapters) -> list[torch.nn.Parameter]:
    return [p for a in adapters for p in (a.A, a.B)]


@pytest.mark.parametrize("task_gradients", [True, False], ids=["accumulates", "no-task-grad"])
def test_hook_update_equals_the_per_layer_formula(task_gradients):
    model = _perturbed_model()  # q/o, k/v, gate/up and down factors: several shape groups
    adapters = list(attached_adapters(model, "default").values())
    model.train()
    if task_gradients:
        ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
        model(input_ids=ids, labels=ids).loss.backward()
    task = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad}
    expected = torch.autograd.grad(reference_orthonormal_loss(adapters), factors(adapters))
    before_optimizer_step(model, TrainingStep(step=0, total_steps=10, lr=1e-5, peak_lr=3e-5, accumulation=4))
    coefficient = 4e-4 / (3e-5 * 4)
    for p, g in zip(factors(adapters), expected):
        added = p.grad if task[id(p)] is None else p.grad - task[id(p)]
        assert torch.allclose(added, coefficient * g, rtol=1e-5, atol=1e-7)
    for a in adapters:  # S gets nothing
        assert (a.S.grad is None) if task[id(a.S)] is None else torch.equal(a.S.grad, task[id(a.S)])


def test_loss_mode_value_and_gradients_equal_the_per_layer_formula():
    model = peftlab.adapt(tiny_llama(), "sorsa", r=4, orth_mode="loss", gamma=0.5)
    perturb_adapters(model)
    adapters = list(attached_adapters(model, "default").values())
    value = peftlab.regularization(model)
    reference = 0.5 * reference_orthonormal_loss(adapters)
    assert torch.allclose(value, reference, rtol=1e-6, atol=0)
    got = torch.autograd.grad(value, factors(adapters))
    expected = torch.autograd.grad(reference, factors(adapters))
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-7)
    assert torch.autograd.grad(value, adapters[0].S, allow_unused=True)[0] is None  # S is not regularised


def hook_op_count(layers: int) -> int:
    """Non-view ATen ops dispatched by the step-mode hook on a tiny Llama of ``layers`` decoder layers,
    after one forward + backward (so that every factor already holds a task gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (func.is_view or torch.Tag.view_copy in func.tags):
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peftlab.adapt(LlamaForCausalLM(config), "sorsa", r=4).train()
    ids = torch.randint(3, 128, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    with CountOps() as counter:
        before_optimizer_step(model, TrainingStep(step=0, total_steps=10, lr=1e-5, peak_lr=3e-5, accumulation=4))
    return counter.count


def test_hook_op_count_does_not_grow_with_depth():
    # Each op is a kernel launch on a GPU: a per-layer loop costs a visible share of a training step.
    assert hook_op_count(6) == hook_op_count(2)


def test_rank_above_the_layer_raises():
    with pytest.raises(peftlab.ConfigError):
        peftlab.adapt(one_layer(), "sorsa", r=25)


@pytest.mark.parametrize("options", [{"r": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"gamma": -1e-4},
                                     {"orth_mode": "both"}])
def test_bad_options_raise(options):
    with pytest.raises(peftlab.ConfigError):
        peftlab.method_class("sorsa")(**options)
