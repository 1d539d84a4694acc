"""NF4 quantized bases (peftlab.quant): the quantizer, the layer, adapters on it, qwha's init against it."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import peftlab
from peftlab import quant
from peftlab.core.files import adapter_state
from peftlab.core.inject import hosts
from peftlab.quant import NF4Linear

from .conftest import VOCAB, make_inputs, output_of, tiny_gpt2, tiny_llama

PROJECTIONS = 14  # tiny Llama: 2 layers x 7 projections; the head stays dense


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def quantized_llama(**options):
    model = tiny_llama()
    refs = quant.quantize(model, keep_reference=True, **options)
    return model, refs


# --------------------------------------------------------------------------------------------------
# The quantizer


def test_code_book_is_qloras_normal_float():
    book = torch.tensor(quant.NF4_CODE_BOOK)
    assert book.shape == (16,) and bool((book[1:] > book[:-1]).all())
    assert book[0] == -1 and book[7] == 0 and book[15] == 1  # exact zero and both ends
    # the published values are the N(0, 1) quantiles of the paper's construction
    assert torch.allclose(quant.normal_float_code_book(), book, atol=1e-6)


def test_dynamic_code_book_of_the_double_quantization():
    book = quant.dynamic_code_book()
    assert book.shape == (256,) and bool((book[1:] > book[:-1]).all())
    assert book[-1] == 1 and (book == 0).sum() == 1
    assert torch.equal(-book[:127], book[128:255].flip(0))  # symmetric but for the single +1
    smallest = book[book > 0].min()
    assert 5e-7 < smallest < 6e-7  # the centre of [0.1, 1] times 10^-6


def test_each_value_takes_the_nearest_code_and_two_share_a_byte():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=gen)
    state = quant.quantize_nf4(weight, blocksize=64, double_quant=False)
    absmax = weight.abs().amax(dim=1)
    assert torch.equal(state["absmax"], absmax)  # one block per row here
    book = torch.tensor(quant.NF4_CODE_BOOK)
    nearest = ((weight / absmax[:, None])[..., None] - book).abs().argmin(-1).reshape(-1)
    packed = state["codes"].reshape(-1)
    assert state["codes"].shape == (8 * 64 // 2, 1) and state["codes"].dtype == torch.uint8
    assert torch.equal(packed >> 4, nearest[0::2].to(torch.uint8))  # first of a pair: high nibble
    assert torch.equal(packed & 15, nearest[1::2].to(torch.uint8))


def test_round_trip_error_is_bounded_by_the_code_book_gaps():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=gen) * 0.02  # 7680 = 120 blocks of 64
    weight[3, :7] *= 40  # an outlier block
    state = quant.quantize_nf4(weight, blocksize=64, double_quant=False)
    back = quant.dequantize_nf4(state, weight.shape, 64)
    book = torch.tensor(quant.NF4_CODE_BOOK)
    half_gap = (book[1:] - book[:-1]).max() / 2  # 0.1385: between 0.7230 and 1
    block_absmax = state["absmax"].repeat_interleave(64).view(weight.shape)
    assert bool(((back - weight).abs() <= half_gap * block_absmax + 1e-7).all())
    assert torch.equal(back.abs().amax(), weight.abs().amax())  # each block's absmax is exact
    gaussian = torch.randn(256, 256, generator=gen)
    error = rel(quant.dequantize_nf4(quant.quantize_nf4(gaussian), gaussian.shape), gaussian)
    assert 0.08 < error < 0.10  # measured 0.092 (the 4-bit NormalFloat error on N(0, 1) weights)


def test_double_quantization_keeps_the_scales_within_one_percent():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 256, generator=gen)  # 2048 blocks -> 8 statistics blocks of 256
    exact = quant.quantize_nf4(weight, double_quant=False)["absmax"]
    state = quant.quantize_nf4(weight, double_quant=True)
    assert state["absmax_codes"].dtype == torch.uint8 and state["absmax_scale"].shape == (8,)
    assert float(((quant.block_absmax(state) - exact) / exact).abs().max()) < 0.01  # measured 0.8 %
    single = rel(quant.dequantize_nf4(quant.quantize_nf4(weight, double_quant=False), weight.shape), weight)
    double = rel(quant.dequantize_nf4(state, weight.shape), weight)
    assert double < single * 1.01


def test_partial_blocks_odd_sizes_and_zero_blocks():
    weight = torch.zeros(3, 43)  # 129 values: two full blocks + one of 1, and an odd count to pack
    weight[0, :5] = torch.tensor([0.5, -0.25, 0.1, -1.0, 0.0])
    weight[2, -1] = 3.0  # alone in the last block: its own absmax
    for double in (False, True):
        state = quant.quantize_nf4(weight, blocksize=64, double_quant=double)
        assert state["codes"].numel() == 65
        back = quant.dequantize_nf4(state, weight.shape, 64)
        assert back[2, -1] == pytest.approx(3.0, rel=1e-2)
        assert bool((back[1] == 0).all())  # an all-zero block decodes to zeros, not NaN
        assert float((back - weight).abs().max()) < 0.15


def test_storage_is_four_and_a_bit_bits_per_weight():
    layer = NF4Linear.from_linear(nn.Linear(512, 256, bias=False))
    weights = 512 * 256
    assert layer.storage_bytes() == weights // 2 + weights // 64 + 4 * -(-weights // 64 // 256) + 4  # 4.127 bits
    single = NF4Linear.from_linear(nn.Linear(512, 256, bias=False), double_quant=False)
    assert single.storage_bytes() == weights // 2 + 4 * (weights // 64)  # 4.5 bits


# --------------------------------------------------------------------------------------------------
# The layer


def test_layer_computes_with_the_dequantized_weight_and_never_saves_it():
    gen = torch.Generator().manual_seed(2)
    dense = nn.Linear(64, 48)
    layer = NF4Linear.from_linear(dense)
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (48, 64)
    x = torch.randn(5, 64, generator=gen, requires_grad=True)

    def shapes_saved_by(module):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            output = module(x)
        return saved, output

    plain, _ = shapes_saved_by(dense)
    saved, y = shapes_saved_by(layer)
    assert (64, 48) in plain and saved == []  # nn.Linear keeps Wᵀ for backward; the NF4 layer recomputes it
    assert torch.allclose(y, nn.functional.linear(x, layer.dequantize(), layer.bias), atol=1e-6)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.allclose(grad, (2 * y) @ layer.dequantize(), atol=1e-5)
    assert rel(layer.dequantize(), dense.weight) < 0.12


def test_casting_the_model_keeps_the_statistics_exact():
    model, _ = quantized_llama()
    layer = model.model.layers[0].mlp.down_proj
    state = {k: v.clone() for k, v in layer.quantized_state().items()}
    model.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert all(torch.equal(v, layer.quantized_state()[k]) for k, v in state.items())
    assert output_of(model, make_inputs("llama")).dtype == torch.bfloat16


def test_weight_reads_are_plain_tensors_and_writes_reach_the_layer():
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=False), merge="requantize")
    codes = layer.codes.clone()
    weight = layer.weight
    weight.requires_grad_(False)  # not a write: the codes stay
    assert type(weight @ weight.T) is torch.Tensor and type(weight.detach()) is torch.Tensor
    assert torch.equal(layer.codes, codes)
    target = torch.full((32, 64), 0.5)
    layer.weight.data.copy_(target)
    assert layer.is_quantized and torch.equal(layer.dequantize(), target)
    layer.weight[:, 0] = -1.0
    assert torch.equal(layer.dequantize()[:, 0], torch.full((32,), -1.0))


# --------------------------------------------------------------------------------------------------
# Whole models


def test_quantize_replaces_the_projections_and_keeps_the_head():
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    refs = quant.quantize(model, keep_reference=True)
    quantized = [p for p, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == PROJECTIONS == len(refs)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(refs["model.layers.0.self_attn.q_proj"], original)
    info = quant.footprint(model)
    assert info["stored_bytes"] * 7 < info["dense_bytes"]  # 4.13 bits of 32
    only_q = tiny_llama()
    assert quant.quantize(only_q, targets=["q_proj"]) is only_q
    assert sum(isinstance(m, NF4Linear) for m in only_q.modules()) == 2


def test_without_keep_reference_nothing_holds_the_fp_weights():
    model = tiny_llama()
    old = weakref.ref(model.model.layers[1].mlp.up_proj.weight)
    quant.quantize(model)
    gc.collect()
    assert old() is None


def test_quantize_refuses_what_it_cannot_do():
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match="method"):
        quant.quantize(model, "int8")
    with pytest.raises(peftlab.ConfigError, match="blocksize"):
        quant.quantize(model, blocksize=48)
    if not torch.cuda.is_available():
        with pytest.raises(peftlab.ConfigError, match="simulated"):
            quant.quantize(model, backend="bitsandbytes")
    peftlab.adapt(model, "lora", r=2)
    with pytest.raises(peftlab.ConfigError, match="quantize the base first"):
        quant.quantize(model)


def test_qlora_trains_only_the_adapter_and_lowers_the_loss():
    model, _ = quantized_llama()
    peftlab.adapt(model, "lora", r=4, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("peftlab" in n.split(".") for n in trainable)
    codes = {p: m.codes.clone() for p, m in model.named_modules() if isinstance(m, NF4Linear)}
    inputs = make_inputs("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # measured 4.86 -> 4.67
    assert all(torch.equal(m.codes, codes[p]) for p, m in model.named_modules() if isinstance(m, NF4Linear))


def _perturb(model, scale=0.3):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.abs().mean() + 0.05))


ADAPTERS = [("lora", {"r": 4}), ("dora", {"r": 4}), ("lora", {"r": 4, "init": "pissa"}), ("ia3", {}),
            ("qwha", {"r": 2, "init": "random"}), ("paca", {"r": 4, "seed": 0})]


@pytest.mark.parametrize("method,options", ADAPTERS, ids=lambda v: v if isinstance(v, str) else "")
def test_mergeable_adapters_on_the_quantized_base(method, options):
    model, _ = quantized_llama()
    inputs = make_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
        peftlab.adapt(model, method, **options)
        assert torch.allclose(output_of(model, inputs), base, atol=1e-5)  # identity at init, on W_deq
        _perturb(model)
        adapted = output_of(model, inputs)
        with peftlab.disabled(model):
            assert torch.equal(output_of(model, inputs), base)
        assert rel(adapted, base) > 1e-3
        peftlab.merge(model)  # merge="float": W_deq + ΔW kept dense, exactly the adapted model
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
    merged = [m for m in model.modules() if isinstance(m, NF4Linear) and not m.is_quantized]
    assert merged and not list(hosts(model))


def test_requantizing_merge_stays_4_bit_and_loses_a_small_update():
    """Re-quantizing W_deq + ΔW: the NF4 grid is coarse next to a trained update, so the merge error is
    about as large as ΔW itself (measured 1.10·‖ΔW‖ on average for ‖ΔW‖ = 1 % of ‖W‖; 0.46·‖ΔW‖ at 20 %)."""
    model, _ = quantized_llama(merge="requantize")
    peftlab.adapt(model, "lora", r=4, dropout=0.0)
    targets = {}
    with torch.no_grad():
        for path, module, slot in hosts(model):
            adapter = slot["default"]
            adapter.lora_B.normal_(generator=torch.Generator().manual_seed(3))
            weight = module.weight.float().clone()
            adapter.lora_B.mul_(0.01 * weight.norm() / adapter.delta_weight(module).norm())
            targets[path] = (weight, adapter.delta_weight(module))
    peftlab.merge(model)
    errors = []
    for path, (weight, delta) in targets.items():
        layer = model.get_submodule(path)
        assert layer.is_quantized
        errors.append(rel(layer.dequantize(), weight + delta) * float((weight + delta).norm() / delta.norm()))
    assert 0.7 < sum(errors) / len(errors) < 1.5


def test_save_on_a_quantized_base_and_load_on_another(tmp_path):
    model, _ = quantized_llama()
    peftlab.adapt(model, "dora", r=4)
    _perturb(model)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftlab.save(model, tmp_path / "adapter")
    fresh, _ = quantized_llama()  # quantization is deterministic: same codes, same fingerprint
    peftlab.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(output_of(fresh, inputs), expected, atol=1e-6)


def _lora_saved_on(model, directory):
    peftlab.adapt(model, "lora", r=4)
    _perturb(model)  # lora_B away from its zero init
    peftlab.save(model, directory)
    return adapter_state(model, "default")


def _assert_loads_with_the_same_adapter(model, directory, expected):
    with pytest.warns(UserWarning, match="fingerprint"):  # W_deq is not W: warned, not refused, for LoRA
        peftlab.load(model, directory)
    loaded = adapter_state(model, "default")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.isfinite(output_of(model, make_inputs("llama"))).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])  # gpt2: Conv1D layout
def test_adapter_saved_on_the_nf4_base_loads_on_the_float_base(tmp_path, make):
    model = make()
    quant.quantize(model)
    expected = _lora_saved_on(model, tmp_path / "adapter")
    fresh = make()
    _assert_loads_with_the_same_adapter(fresh, tmp_path / "adapter", expected)
    assert not any(isinstance(m, NF4Linear) for m in fresh.modules())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_adapter_saved_on_the_float_base_loads_on_the_nf4_base(tmp_path, make):
    expected = _lora_saved_on(make(), tmp_path / "adapter")
    model = make()
    quant.quantize(model)
    _assert_loads_with_the_same_adapter(model, tmp_path / "adapter", expected)


def _llama(hidden: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_an_nf4_adapter_still_refuses_other_layer_shapes(tmp_path, quantized):
    model = tiny_llama()
    quant.quantize(model)
    peftlab.save(peftlab.adapt(model, "lora", r=4), tmp_path / "adapter")
    peftlab.save(peftlab.adapt(model, "lora", r=4, targets=["up_proj", "down_proj"], name="mlp"),
                 tmp_path / "mlp", name="mlp")
    # wider everywhere; then the MLP's (48, 32) and (32, 48) swapped: as many weights, other shapes. On an
    # NF4 host the swapped layers pass the layer check (a quantized layer may stand for a GPT-2 Conv1D,
    # stored transposed) and the adapter's own tensor shapes refuse them.
    for other, directory in [(_llama(48, 48), "adapter"), (_llama(48, 32), "mlp")]:
        if quantized:
            quant.quantize(other)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # other weights: the fingerprint differs too
            with pytest.raises(peftlab.AdapterFileError, match="shape mismatch|has shape"):
                peftlab.load(other, tmp_path / directory)
        assert peftlab.adapters(other) == {}


def test_dequantize_gives_plain_linear_layers_with_the_same_function():
    model, _ = quantized_llama()
    inputs = make_inputs("llama")
    with torch.no_grad():
        before = output_of(model, inputs)
    quant.dequantize(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(output_of(model, inputs), before, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# qwha's quantization-aware init


def _layer_inputs(model, batches) -> dict[str, torch.Tensor]:
    seen: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(lambda _, args, p=p: seen.setdefault(p, []).append(args[0]))
               for p, m in model.named_modules() if p.endswith("_proj")]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {p: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for p, xs in seen.items()}


def _layer_error(model, refs, inputs) -> float:
    """Mean over layers of ‖layer(X) − X W_fpᵀ‖ / ‖X W_fpᵀ‖, X the full-precision model's inputs."""
    with torch.no_grad():
        return sum(rel(model.get_submodule(p)(x), x @ refs[p].T) for p, x in inputs.items()) / len(inputs)


def _svd_of_the_error(model, refs, r):
    """LoRA at the best rank-r fit of W_fp − W_deq (LoftQ with one alternation): as many parameters as qwha."""
    peftlab.adapt(model, "lora", r=r, dropout=0.0)
    with torch.no_grad():
        for path, module, slot in hosts(model):
            adapter = slot["default"]
            u, s, vh = torch.linalg.svd(refs[path] - module.weight, full_matrices=False)
            root = (s[:r] / adapter.scale).sqrt()
            adapter.lora_B.copy_(u[:, :r] * root)
            adapter.lora_A.copy_(root[:, None] * vh[:r])


def test_qwha_init_cancels_much_of_the_quantization_error():
    calibration = [make_inputs("llama", batch=4, length=16, seed=s) for s in range(4)]
    held_out = make_inputs("llama", batch=4, length=16, seed=99)
    full = tiny_llama()
    with torch.no_grad():
        target = output_of(full, held_out)
    inputs = _layer_inputs(full, [held_out])
    model, refs = quantized_llama()

    def errors():
        with torch.no_grad():
            return rel(output_of(model, held_out), target), _layer_error(model, refs, inputs)

    nf4 = errors()  # = LoRA's zero init: the adapter adds nothing at step 0
    peftlab.adapt(model, "qwha", r=2, reference=refs, calibration=calibration)
    qwha = errors()
    peftlab.delete(model, "default")
    _svd_of_the_error(model, refs, r=2)
    svd = errors()
    # measured (logits, mean layer): NF4 / LoRA zero init 0.054, 0.091; qwha 0.036, 0.062; SVD-LoRA 0.044, 0.081
    assert qwha[0] < 0.75 * nf4[0] and qwha[1] < 0.75 * nf4[1]
    assert qwha[0] < svd[0] and qwha[1] < svd[1]


def test_qwha_init_needs_the_reference_on_a_quantized_base():
    model, refs = quantized_llama()
    calibration = [make_inputs("llama")]
    with pytest.raises(peftlab.ConfigError, match="reference"):
        peftlab.adapt(model, "qwha", r=2, calibration=calibration)
    peftlab.adapt(model, "qwha", r=2, reference=refs, calibration=calibration)
    assert "reference" not in peftlab.adapters(model)["default"].options()  # used once, not saved


# --------------------------------------------------------------------------------------------------
# bitsandbytes (run where CUDA and bitsandbytes are installed)


def _bitsandbytes_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("shape", [(2048, 2048), (512, 8192), (96, 80)])
def test_simulated_nf4_matches_bitsandbytes(shape, double):
    bnbf = _bitsandbytes_on_cuda()
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    ours = quant.quantize_nf4(weight, 64, double)
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double, quant_type="nf4")
    assert float((ours["codes"] == codes).float().mean()) > 1 - 1e-5  # ulp ties aside, identical
    if double:
        assert float((ours["absmax_codes"] == state.absmax).float().mean()) > 1 - 1e-4
        assert torch.allclose(ours["absmax_scale"], state.state2.absmax)
    else:
        assert torch.equal(ours["absmax"], state.absmax)
    ours_weight = quant.dequantize_nf4(ours, shape, 64, torch.bfloat16)
    assert float((ours_weight != bnbf.dequantize_4bit(codes, state)).float().mean()) < 1e-4


def test_bitsandbytes_backend_trains_like_the_simulated_one():
    _bitsandbytes_on_cuda()
    inputs = {k: v.cuda() for k, v in make_inputs("llama").items()}
    outputs = {}
    for backend in ("bitsandbytes", "simulated"):
        model = tiny_llama().cuda().to(torch.bfloat16)
        quant.quantize(model, backend=backend)
        assert all(m.backend == backend for m in model.modules() if isinstance(m, NF4Linear))
        peftlab.adapt(model, "lora", r=4, dropout=0.0)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        outputs[backend] = (loss.detach().float(), grads.float())
    assert torch.allclose(outputs["bitsandbytes"][0], outputs["simulated"][0], rtol=2e-2)
    assert rel(outputs["bitsandbytes"][1], outputs["simulated"][1]) < 0.05
    auto = tiny_llama().cuda()
    quant.quantize(auto)
    assert auto.model.layers[0].self_attn.q_proj.backend == "bitsandbytes"
