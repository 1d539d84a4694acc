"""Activation offload (peftlab.train.offload). On CPU, device_type="cpu" runs the same bookkeeping (host
buffers, prefetch order, what stays) with synchronous copies; the CUDA test adds the side stream and memory."""

from __future__ import annotations

import weakref

import pytest
import torch

from peftlab.core.errors import ConfigError
from peftlab.train.loss import SupervisedLoss
from peftlab.train.offload import ActivationOffload

from .conftest import lora_llama, tiny_llama

IDS = torch.arange(3, 35).view(2, 16)


def _grads(model, offload: ActivationOffload | None, body_only: bool = False):
    with offload if offload is not None else torch.enable_grad():
        if body_only:
            out = model.model(input_ids=IDS, use_cache=False).last_hidden_state
        else:
            out = model(input_ids=IDS, labels=IDS).loss
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * probe).sum().backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_offloaded_step_gives_the_same_gradients_and_reads_everything_back():
    expected = _grads(lora_llama(), None)
    model = lora_llama()
    offload = ActivationOffload(model, min_bytes=0, device_type="cpu")
    grads = _grads(model, offload)
    assert all(torch.equal(got, want) for got, want in zip(grads, expected, strict=True))
    assert offload.offloaded_bytes() > 0
    assert all(entry.read and entry.on_device is None for entry in offload.entries)  # no prefetch left over


def test_compiled_checkpointed_blocks_offload_their_inputs(partitioned_compile):
    runs = []
    for offloaded in (False, True):
        torch._dynamo.reset()
        model = lora_llama(checkpointed=True)
        with SupervisedLoss(model, compile_body=True):
            offload = ActivationOffload(model, min_bytes=2 * 16 * 32 * 8, device_type="cpu")  # hidden states
            runs.append(_grads(model, offload if offloaded else None, body_only=True))
    for got, want in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(got, want)
    shapes = [tuple(entry.host.shape) for entry in offload.entries]
    assert len(shapes) >= 2 and all(shape == (2, 16, 32) for shape in shapes)  # one block input per layer at least


def test_frozen_weights_small_tensors_and_strided_views_stay_where_they_are():
    layer = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)
    offload = ActivationOffload(layer, min_bytes=0, device_type="cpu")
    with offload:
        layer(x).sum().backward()  # saves only the frozen weight
        (x * 2)[:, ::2].sin().sum().backward()  # saves a view with gaps
    assert offload.offloaded_bytes() == 0 and x.grad is not None
    added_later = torch.nn.Linear(64, 64, bias=False)  # trainable: saves x; x needs a gradient: saves its weight
    with offload:
        added_later(x).sum().backward()
    assert offload.offloaded_bytes() == x.numel() * x.element_size()
    with ActivationOffload(layer, min_bytes=4 * 64 * 4 + 1, device_type="cpu") as offload:
        (x * 2).sin().sum().backward()
    assert offload.offloaded_bytes() == 0


class _Saves(torch.autograd.Function):
    """Doubles its input and saves it; backward records the saved tensor's strides and what the
    offloader holds on the device at that moment."""
    seen: list = []
    offload: ActivationOffload | None = None

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        on_device = sum(entry.on_device is not None for entry in _Saves.offload.entries)
        _Saves.seen.append((x.stride(), on_device))
        return grad * 2


def _chain(offload: ActivationOffload, layers: int, transposed: bool = False, rows: int = 8):
    _Saves.seen, _Saves.offload = [], offload
    x = torch.randn(rows, 16, requires_grad=True)
    with offload:
        h = x * 1
        h = h.t() if transposed else h
        first = weakref.ref(h)
        for _ in range(layers):
            h = _Saves.apply(h)
    return h, first


def test_an_offloaded_tensor_is_freed_and_comes_back_with_its_strides():
    offload = ActivationOffload(torch.nn.Linear(1, 1), min_bytes=0, device_type="cpu")
    out, first = _chain(offload, layers=1, transposed=True)
    assert first() is None  # only the host copy remains
    out.sum().backward()
    assert _Saves.seen == [((1, 16), 0)]


@pytest.mark.parametrize("ahead, expected", [(0, [0, 0, 0]), (1, [1, 1, 0]), (2, [2, 1, 0])])
def test_backward_prefetches_the_entries_before_it_within_the_budget(ahead, expected):
    one = 8 * 16 * 4
    offload = ActivationOffload(torch.nn.Linear(1, 1), min_bytes=0, prefetch_bytes=ahead * one, device_type="cpu")
    out, _ = _chain(offload, layers=3)
    out.sum().backward()
    assert [held for _, held in _Saves.seen] == expected


def test_a_second_backward_fetches_again_and_host_buffers_serve_the_next_steps_shapes():
    offload = ActivationOffload(torch.nn.Linear(1, 1), min_bytes=0, device_type="cpu")
    out, _ = _chain(offload, layers=3)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert len(_Saves.seen) == 6
    buffers = {entry.host.data_ptr() for entry in offload.entries}
    del out
    out, _ = _chain(offload, layers=3, rows=7)  # another length, the same size class
    assert {entry.host.data_ptr() for entry in offload.entries} == buffers
    out.sum().backward()
    assert len(_Saves.seen) == 3


def test_offload_needs_a_gpu_model():
    with pytest.raises(ConfigError, match="from a GPU"):
        SupervisedLoss(tiny_llama(), offload_activations=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_gradients_match_and_activations_leave_the_gpu():
    def step(offload: ActivationOffload | None):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        x = torch.randn(1024, 4096, device="cuda", requires_grad=True)
        with offload if offload is not None else torch.enable_grad():
            h = x
            for _ in range(16):  # each saves its 16 MiB input
                h = (h * 1.01).sin()
        h.sum().backward()
        torch.cuda.synchronize()
        return x.grad, torch.cuda.max_memory_allocated() - start

    torch.manual_seed(0)
    expected, plain_peak = step(None)
    torch.manual_seed(0)
    grad, offloaded_peak = step(ActivationOffload(torch.nn.Linear(1, 1), prefetch_bytes=32 << 20))
    assert torch.equal(grad, expected)
    assert offloaded_peak < plain_peak / 2
