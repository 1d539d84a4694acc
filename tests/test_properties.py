"""Properties every registered method must have, checked on tiny Llama, GPT-2 and BERT models.

A new method is picked up automatically from ``peftlab.methods()``; its own test file under
tests/methods/ gives the options that fit the tiny models (hidden size 32), else it runs with its
defaults.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.core.inject import hosts
from peftlab.core.method import LayerMethod

from .conftest import MODELS, compiled_blocks_output, make_inputs, output_of


def _collect() -> tuple[dict, list, set, dict]:
    """Each tests/methods/test_*.py may define CASES, VARIANTS, UNSUPPORTED and TRAIN_LR."""
    cases, variants, unsupported, lrs = {}, [], set(), {}
    folder = Path(__file__).parent / "methods"
    for path in sorted(folder.glob("test_*.py")):
        module = importlib.import_module(f"tests.methods.{path.stem}")
        cases.update(getattr(module, "CASES", {}))
        variants += getattr(module, "VARIANTS", [])
        unsupported |= getattr(module, "UNSUPPORTED", set())
        lrs.update(getattr(module, "TRAIN_LR", {}))
    return cases, variants, unsupported, lrs


# CASES: options fitting the tiny models per method; VARIANTS: further (method, options) to check;
# UNSUPPORTED: (method, model) pairs for which adapt must raise TargetError.
CASES, VARIANTS, UNSUPPORTED, TRAIN_LR = _collect()


def all_cases() -> list[tuple[str, dict]]:
    return [(m, CASES.get(m, {})) for m in peftlab.methods()] + VARIANTS


def case_id(case: tuple[str, dict]) -> str:
    method, options = case
    extra = "-".join(f"{k}={v}" for k, v in options.items() if (k, v) not in CASES.get(method, {}).items())
    return method + (f"[{extra}]" if extra else "")


CASE_LIST = all_cases()
CASE_IDS = [case_id(c) for c in CASE_LIST]


def supported(case, kind) -> bool:
    return (case[0], kind) not in UNSUPPORTED


def build(case, kind, seed: int = 0):
    method, options = case
    model = MODELS[kind](seed)
    inputs = make_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
    kwargs = dict(options)
    if getattr(peftlab.method_class(method), "needs_calibration", False):
        kwargs["calibration"] = [make_inputs(kind, seed=s) for s in range(4)]
    torch.manual_seed(1234)
    peftlab.adapt(model, method, **kwargs)
    return model, inputs, base


def perturb(model, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen).to(p)
                p.add_(noise * scale * (p.abs().mean() + 0.05))


def close(a, b, tol: float = 1e-4) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


params = pytest.mark.parametrize("case", CASE_LIST, ids=CASE_IDS)
kinds = pytest.mark.parametrize("kind", list(MODELS))


@params
def test_bf16_model_trains_fp32_parameters_in_bf16_activations(case):
    """Adapter weights stay fp32 on a bf16 base: bf16 copies would round small optimizer steps away
    (PEFT's LN tuning on Gemma loses most of its steps, docs/quality-benchmark.md)."""
    if not supported(case, "llama"):
        pytest.skip("unsupported pair (covered by test_only_adapter_parameters_train)")
    method, options = case
    model = MODELS["llama"](0).to(torch.bfloat16)
    kwargs = dict(options)
    if getattr(peftlab.method_class(method), "needs_calibration", False):
        kwargs["calibration"] = [make_inputs("llama", seed=s) for s in range(4)]
    peftlab.adapt(model, method, **kwargs)
    inputs = make_inputs("llama")
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert out.logits.dtype == torch.bfloat16 and {p.dtype for p in trainable} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


@params
@kinds
def test_only_adapter_parameters_train(case, kind):
    if not supported(case, kind):
        with pytest.raises(peftlab.TargetError):
            build(case, kind)
        return
    model, inputs, _ = build(case, kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("peftlab" in n.split(".") for n in trainable)
    model.train()
    output_of(model, inputs).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@params
@kinds
def test_trainable_count_matches_formula(case, kind):
    if not supported(case, kind):
        pytest.skip("unsupported pair (covered by test_only_adapter_parameters_train)")
    model, _, _ = build(case, kind)
    config = peftlab.adapters(model)["default"]
    if isinstance(config, LayerMethod):
        from peftlab.core.targets import role_of

        expected = config.attachment_count([(m, role_of(model, p)) for p, m, _ in hosts(model)])
        if expected is None:
            pytest.skip(f"{config.name}'s count depends on the weights; its own tests check it")
    else:
        expected = config.trainable_count_for(model.config)
    assert peftlab.trainable_parameter_count(model) == expected


@params
@kinds
def test_init_matches_what_the_method_promises(case, kind):
    if not supported(case, kind):
        pytest.skip("unsupported pair")
    model, inputs, base = build(case, kind)
    config = peftlab.adapters(model)["default"]
    with torch.no_grad():
        out = output_of(model, inputs)
    assert out.shape == base.shape
    if config.identity_at_init:
        assert close(out, base)
    else:  # the promised change may be tiny (nlora's is O(|W0|^3)); it must exist
        assert not torch.equal(out, base)


@params
@kinds
def test_perturbed_adapter_changes_output_and_disabled_is_base(case, kind):
    if not supported(case, kind):
        pytest.skip("unsupported pair")
    model, inputs, base = build(case, kind)
    perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
        assert not close(adapted, base)
        with peftlab.disabled(model):
            assert close(output_of(model, inputs), base, 1e-5)
        assert close(output_of(model, inputs), adapted, 1e-6)


@params
@kinds
def test_save_load_round_trip(case, kind, tmp_path):
    if not supported(case, kind):
        pytest.skip("unsupported pair")
    model, inputs, _ = build(case, kind)
    perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
    peftlab.save(model, tmp_path / "adapter")
    fresh = MODELS[kind](0)
    torch.manual_seed(999)  # loading must not depend on the RNG
    peftlab.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert close(output_of(fresh, inputs), adapted, 1e-5)
    assert peftlab.trainable_parameter_count(fresh) == peftlab.trainable_parameter_count(model)


@params
@kinds
def test_merge_equals_unmerged_or_refuses(case, kind):
    if not supported(case, kind):
        pytest.skip("unsupported pair")
    model, inputs, _ = build(case, kind)
    perturb(model)
    config = peftlab.adapters(model)["default"]
    with torch.no_grad():
        adapted = output_of(model, inputs)
    if not config.mergeable:
        with pytest.raises(peftlab.MergeError):
            peftlab.merge(model)
        assert "default" in peftlab.adapters(model)
        return
    peftlab.merge(model)
    assert not list(hosts(model)) and not peftlab.adapters(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert close(output_of(model, inputs), adapted, 1e-4)


@params
def test_a_few_training_steps_reduce_the_loss(case):
    model, inputs, _ = build(case, "llama")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TRAIN_LR.get(case[0], 3e-2))
    labels = inputs["input_ids"]
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=labels).loss
        reg = peftlab.regularization(model)
        total = loss if reg is None else loss + reg
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # a random tiny model: ~1% of ln(vocab) is a real drop


@params
def test_compiled_blocks_are_one_graph_each_and_match_eager(case):
    """``compile`` compiles each decoder block: a graph break inside (a branch on a tensor, an untraceable
    call) splits every block at every adapter, which ran DiffoRA and Polyhistor at up to 1.9x LoRA's
    step on the GPU. Dynamo's eager backend checks the tracing alone (fullgraph: a break raises)."""
    if not supported(case, "llama"):
        pytest.skip("unsupported pair (covered by test_only_adapter_parameters_train)")
    model, inputs, _ = build(case, "llama")
    perturb(model)
    model.eval()
    with torch.no_grad():
        expected = output_of(model, inputs)
    torch.testing.assert_close(compiled_blocks_output(model, inputs), expected)
