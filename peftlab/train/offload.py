"""Activation offload: what backward will read waits in pinned host memory, not on the GPU.

Inside ``with ActivationOffload(model):`` every activation autograd saves for backward (parameters
excepted, and tensors under ``min_bytes``) is copied to a pinned host buffer on a side stream and
freed on the GPU. Backward copies each one back when it is needed, and starts copying the ones
after it (in backward's order, the reverse of forward's) ahead of time, so the transfers overlap
computation.

It pays with checkpointed, compiled blocks (``SupervisedLoss(..., offload_activations=True)``):
each block then saves little more than its input, and those inputs, one per layer, are what is left
of the activations on the GPU. On an 8B Llama at 4 x 2048 tokens they are 32 x 64 MiB: offloaded,
the peak fell from 19.76 to 17.72 GiB and the step slowed by 0.6% (H100,
benchmarks/results/speed-2026-12-07-3988a61.md). Without checkpointing it moves every saved
activation both ways: more memory saved, and more transfer time to hide (not measured).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn


class _HostPool:
    """Pinned byte buffers reused across steps (pinning costs far more than a copy), in size classes at
    most a quarter above the sizes they serve: a tensor takes a buffer of its class whatever its shape,
    so varying sequence lengths reuse buffers instead of pinning more for every new length."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a buffer, a view of it with ``like``'s shape, strides and dtype)."""
        nbytes = like.nbytes
        size = _size_class(nbytes)
        spare = self.free.get(size)
        buffer = spare.pop() if spare else torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return buffer, buffer[:nbytes].view(like.dtype).as_strided(like.shape, like.stride())

    def give(self, buffer: torch.Tensor) -> None:
        self.free.setdefault(buffer.numel(), []).append(buffer)


def _size_class(nbytes: int) -> int:
    step = max((1 << max(nbytes - 1, 1).bit_length()) // 8, 4096)
    return -(-nbytes // step) * step


class _Offloaded:
    """One saved tensor in a host buffer, and its copy back on the device while backward needs it.

    The buffer goes back to the pool when autograd drops this entry (its graph is freed): a later
    forward may then overwrite it, and no backward can still read it."""

    def __init__(self, buffer: torch.Tensor, host: torch.Tensor, device: torch.device, index: int, pool: _HostPool):
        self.buffer, self.host, self.device, self.index, self.pool = buffer, host, device, index, pool
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.read = False  # by backward: prefetching skips it (a second backward fetches it again)

    def __del__(self):
        self.pool.give(self.buffer)


class ActivationOffload:
    def __init__(self, model: nn.Module, min_bytes: int = 8 << 20, prefetch_bytes: int = 64 << 20,
                 device_type: str = "cuda"):
        """``min_bytes``: smaller saved tensors stay where they are (rotary tables, LoRA products:
        not worth a transfer). ``prefetch_bytes``: how much backward may bring back ahead of use (one
        entry even if larger; 0: none). One block's backward outlasts the transfer of the next block's
        input (8B Llama, 4 x 2048: 64 MiB, about 3 ms over PCIe against some 15 ms of compute), so one
        ahead keeps the transfers hidden; each further one adds its size to the backward peak.
        ``device_type``: the device whose tensors are offloaded; "cpu" exercises the bookkeeping
        (copies to host buffers, synchronously) where there is no GPU, as the tests do."""
        self.frozen = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
        self.min_bytes, self.prefetch_bytes, self.device_type = min_bytes, prefetch_bytes, device_type
        self.pool = _HostPool(pin=device_type == "cuda")
        self.side = torch.cuda.Stream() if device_type == "cuda" else None
        self.entries: list[_Offloaded] = []
        self._hooks: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> ActivationOffload:
        self.entries = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
        self._hooks = None

    def offloaded_bytes(self) -> int:
        """Bytes moved to the host during the last forward."""
        return sum(entry.host.nbytes for entry in self.entries)

    def _keeps(self, tensor: torch.Tensor) -> bool:
        """Parameters and their views (also of parameters added after this was built), tensor
        subclasses (quantized or sharded weights), small tensors and views with gaps stay."""
        base = tensor if tensor._base is None else tensor._base
        return (type(tensor) is not torch.Tensor or isinstance(base, nn.Parameter)
                or tensor.device.type != self.device_type or not _dense(tensor)
                or tensor.nbytes < self.min_bytes
                or tensor.untyped_storage().data_ptr() in self.frozen)

    def _pack(self, tensor: torch.Tensor):
        if self._keeps(tensor):
            return tensor
        buffer, host = self.pool.take(tensor)
        with self._on_side():
            host.copy_(tensor, non_blocking=self.side is not None)
        if self.side is not None:
            tensor.record_stream(self.side)  # its GPU memory is reused only once the copy has read it
        entry = _Offloaded(buffer, host, tensor.device, len(self.entries), self.pool)
        self.entries.append(entry)
        return entry

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.on_device is None:
            self._fetch(packed)
        restored, packed.on_device, packed.read = packed.on_device, None, True
        if packed.ready is not None:
            torch.cuda.current_stream().wait_event(packed.ready)
        self._prefetch_before(packed.index)
        return restored

    def _prefetch_before(self, index: int) -> None:
        """Start bringing back the entries forward saved just before ``index``: backward reads them next."""
        pending = 0
        for entry in reversed(self.entries[:index]):
            if entry.read:
                continue
            if pending >= self.prefetch_bytes:
                return
            if entry.on_device is None:
                self._fetch(entry)
            pending += entry.host.nbytes

    def _fetch(self, entry: _Offloaded) -> None:
        on_device = torch.empty_strided(entry.host.shape, entry.host.stride(), dtype=entry.host.dtype,
                                        device=entry.device)
        with self._on_side():
            on_device.copy_(entry.host, non_blocking=self.side is not None)
            entry.ready = self.side.record_event() if self.side is not None else None
        if self.side is not None:
            on_device.record_stream(self.side)
        entry.on_device = on_device

    def _on_side(self):
        """The side stream, after the work queued so far: what it reads is computed, and the memory
        it writes is no longer in use."""
        if self.side is None:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.side)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor covers its memory without gaps or overlap (any dimension order), so a
    buffer of the same shape and strides holds exactly its elements."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
