"""4-bit NormalFloat (NF4) base layers, for QLoRA-style training of any peftlab adapter.

    refs = peftlab.quant.quantize(model, keep_reference=True)   # nn.Linear -> NF4Linear, in place
    peftlab.adapt(model, "qwha", reference=refs, calibration=batches)   # or "lora", "dora", ...
    del refs                                                     # the fp weights were only for the init

The quantizer is QLoRA's (Dettmers et al. 2023, arXiv 2305.14314), written to give the same bits as
bitsandbytes' CUDA kernels for ``quant_type="nf4"`` (tests/test_quant.py compares them where CUDA and
bitsandbytes are installed):

* the weight is flattened row-major ((out, in), the nn.Linear layout) and cut into blocks of
  ``blocksize`` (64) values; each block keeps its absmax ``a`` (fp32) and every value becomes the index
  of the nearest entry of the NF4 code book to ``w · (1/a)`` (ties go to the lower entry);
* two indices share one byte, the first in the high nibble;
* double quantization (``double_quant=True``, QLoRA's default) stores the absmax values themselves in
  8 bits: their mean ``c`` is subtracted, and blocks of 256 of them are quantized with the signed
  8-bit *dynamic* code (below) against their own fp32 absmax; 0.127 bits per weight instead of 0.5;
* dequantization is ``code[index] · a`` in fp32 (``a = dynamic[q] · a₂ + c`` with double
  quantization), then cast to the compute dtype.

The NF4 code book (QLoRA, appendix E): the quantiles of N(0, 1) at evenly spaced probabilities,
8 for the positive half and 7 for the negative half (so that 0 is represented exactly), each half
starting from probability δ = ½(1 − 1/32 + 1 − 1/30) = 0.9677083, scaled into [−1, 1]
(``normal_float_code_book`` recomputes it)::

    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0

The 8-bit dynamic code (Dettmers 2015, "8-bit approximations", arXiv 1511.04561) used for the double
quantization: for each decade k = 0 … 6 (magnitudes 10^(k−6) … 10^(k−5)), the 2^k centres of
2^k equal steps over [0.1, 1], times 10^(k−6), with both signs; plus 0 and 1 (256 values).

Backends. On CUDA with bitsandbytes importable (``backend="auto"``), the quantization and the
matmul run in bitsandbytes' kernels (``quantize_4bit``, ``matmul_4bit``: the weight is dequantized
per call and again in backward, never kept). Elsewhere, or with ``backend="simulated"``, the same
quantizer runs in PyTorch, and the forward dequantizes inside an autograd function that recomputes
the weight in backward, so training keeps only the 4-bit state on the device here too. Both store the
same tensors in the same layout (``codes`` (n/2, 1) uint8, the absmax statistics), so a model
quantized on the CPU runs with bitsandbytes' kernels once moved to a GPU (``layer.backend``).

Adapters. ``NF4Linear`` is an nn.Linear: every linear-layer method attaches to it. Its ``weight``
is the dequantized (out, in) matrix, made on each access and not stored, so methods that read the
base weight (DoRA's norms, PiSSA's SVD, qwha's init target W_ref − W_base) see the quantized base.
Writing into it (what ``peftlab.merge`` does) goes to the layer: under ``merge="float"`` (default)
the layer stores W_deq + ΔW densely in its compute dtype and drops its codes, which keeps the merged
model equal to the adapted one; under ``merge="requantize"`` it quantizes W_deq + ΔW again and stays
4-bit, which rounds most of a small update away (see docs/quantization.md for the measured loss).
``dequantize(model)`` turns NF4 layers back into plain nn.Linear.
"""

from __future__ import annotations

import weakref
from typing import Literal, overload

import torch
from torch import nn
from torch.nn import functional as F

from peftlab.core.errors import ConfigError
from peftlab.core.inject import book_of
from peftlab.core.layers import is_linear, weight_matrix
from peftlab.core.targets import output_head_paths, resolve_targets

NF4_CODE_BOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_OFFSET = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))  # QLoRA's δ: the first quantile probability of each half
STATISTICS_BLOCK = 256  # absmax values per block of the double quantization
BACKENDS = ("auto", "bitsandbytes", "simulated")
References = dict[str, torch.Tensor]  # module path -> full-precision (out, in) weight
MERGES = ("float", "requantize")


def normal_float_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 from its definition: N(0, 1) quantiles, 8 positive + 0 + 7 negative, scaled to [−1, 1]."""
    probe = torch.float64
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=probe)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=probe)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=probe), negative]).sort().values
    return (values / values.abs().max()).float()


def dynamic_code_book() -> torch.Tensor:
    """The signed 8-bit dynamic code (256 sorted values) of the double quantization."""
    values = [torch.zeros(1), torch.ones(1)]
    for k in range(7):
        bounds = torch.linspace(0.1, 1, 2**k + 1, dtype=torch.float32)
        centres = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (k - 6)  # in fp32 throughout, as bitsandbytes
        values += [centres, -centres]
    return torch.cat(values).sort().values


_TABLES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _table(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code book, decision thresholds) on ``device``; thresholds are the fp64 midpoints rounded to
    fp32, as the constants in bitsandbytes' CUDA kernel."""
    key = (kind, torch.device(device))
    if key not in _TABLES:
        code = torch.tensor(NF4_CODE_BOOK) if kind == "nf4" else dynamic_code_book()
        wide = code.double()
        _TABLES[key] = code.to(device), ((wide[:-1] + wide[1:]) / 2).float().to(device)
    return _TABLES[key]


# --------------------------------------------------------------------------------------------------
# Blockwise quantization (the functional form; NF4Linear stores its result)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, every value times the reciprocal of its block's absmax); a last partial
    block has its own absmax."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = padded * (1.0 / absmax.clamp_min(1e-38))[:, None]  # all-zero blocks stay zero
    return absmax, scaled.reshape(-1)[:n].clamp(-1, 1)


def _nearest(values: torch.Tensor, kind: str) -> torch.Tensor:
    _, thresholds = _table(kind, values.device)
    return torch.bucketize(values, thresholds).to(torch.uint8)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """The first ``n`` of ``values`` times their block's absmax; ``values`` (blocks · blocksize) is scaled
    in place, so dequantizing a layer allocates one fp32 copy of it and not three."""
    values.view(absmax.numel(), blocksize).mul_(absmax[:, None])
    return values[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 state of ``weight``: ``codes`` ((n+1)//2, 1) uint8 and either ``absmax`` (fp32, one per
    block) or, double-quantized, ``absmax_codes`` (uint8), ``absmax_scale`` (fp32, one per 256 blocks)
    and ``absmax_offset`` (fp32 scalar)."""
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax(flat, blocksize)
    indices = _nearest(scaled, "nf4")
    if indices.numel() % 2:
        indices = F.pad(indices, (0, 1), value=7)  # index 7 is 0.0: padding dequantizes to nothing
    state = {"codes": ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)}
    if not double_quant:
        return {**state, "absmax": absmax}
    offset = absmax.mean()
    scale, scaled_absmax = _blockwise_absmax(absmax - offset, STATISTICS_BLOCK)
    return {**state, "absmax_codes": _nearest(scaled_absmax, "dynamic"), "absmax_scale": scale,
            "absmax_offset": offset}


def block_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 absmax per block, decoded from the double quantization when there is one."""
    if "absmax" in state:
        return state["absmax"]
    indices = state["absmax_codes"]
    code, _ = _table("dynamic", indices.device)
    values = torch.zeros(state["absmax_scale"].numel() * STATISTICS_BLOCK, device=indices.device)
    values[: indices.numel()] = code[indices.int()]
    return _scale_blocks(values, state["absmax_scale"], STATISTICS_BLOCK, indices.numel()) + state["absmax_offset"]


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, ...], blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    packed = state["codes"].reshape(-1)
    absmax = block_absmax(state)
    code, _ = _table("nf4", packed.device)
    values = torch.zeros(absmax.numel() * blocksize, device=packed.device)  # >= 2·len(packed): blocksize is even
    values[0 : 2 * packed.numel() : 2] = code[(packed >> 4).int()]
    values[1 : 2 * packed.numel() : 2] = code[(packed & 15).int()]
    n = int(torch.Size(shape).numel())
    return _scale_blocks(values, absmax, blocksize, n).view(shape).to(dtype)


# --------------------------------------------------------------------------------------------------
# The layer


class _DequantizedMatmul(torch.autograd.Function):
    """x Wᵀ with W dequantized in forward and again in backward: the dense W is never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


_STAT_KEYS = ("absmax", "absmax_scale", "absmax_offset")  # fp32, stored bit-cast to int32


class NF4Linear(nn.Linear):
    """A linear layer whose weight is held as NF4 codes + blockwise absmax (see the module doc).

    ``weight`` is a dequantized copy made on access; writes into it land in the layer (merge).
    The fp32 statistics are stored bit-cast to int32 so that ``model.to(torch.bfloat16)`` leaves
    them exact, as bitsandbytes keeps them outside the module's floating-point tensors.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, backend: str = "simulated", merge: str = "float",
                 compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a dense weight
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.backend, self.merge_policy, self.compute_dtype = backend, merge, compute_dtype
        numel = in_features * out_features
        blocks = -(-numel // blocksize)
        # Registered first: Site.device / Site.dtype read the first parameter (a model without biases
        # has no other), and bitsandbytes keeps its codes in a Parameter too.
        self.codes = nn.Parameter(torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device),
                                  requires_grad=False)
        self.register_parameter("dense", None)  # the weight after a float merge
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=compute_dtype)) if bias else None
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self._register_stat("absmax_scale", torch.zeros(-(-blocks // STATISTICS_BLOCK), device=device))
            self._register_stat("absmax_offset", torch.zeros((), device=device))
        else:
            self._register_stat("absmax", torch.zeros(blocks, device=device))

    def _register_stat(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(f"{name}_bits", value.float().view(torch.int32))

    @classmethod
    def from_linear(cls, module: nn.Module, *, blocksize: int = 64, double_quant: bool = True,
                    backend: str = "simulated", merge: str = "float") -> NF4Linear:
        """Quantize an nn.Linear (or transformers' Conv1D, whose stored weight is transposed)."""
        matrix = weight_matrix(module).detach()
        out_features, in_features = matrix.shape
        layer = cls(in_features, out_features, module.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, backend=backend, merge=merge, compute_dtype=matrix.dtype,
                    device="meta")
        layer.load_quantized(_quantize_with(backend, matrix, blocksize, double_quant), device=matrix.device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return layer

    def load_quantized(self, state: dict[str, torch.Tensor], device=None) -> None:
        """Take a quantize_nf4 state (replaces the codes and statistics; the layer is 4-bit again)."""
        self.codes = nn.Parameter(state["codes"].to(device), requires_grad=False)
        for key, value in state.items():
            if key in _STAT_KEYS:
                self._register_stat(key, value.to(device))
            elif key != "codes":
                self.register_buffer(key, value.to(device))
        self.dense = None

    def quantized_state(self) -> dict[str, torch.Tensor]:
        """The NF4 state in quantize_nf4's form (fp32 statistics decoded from their int32 storage)."""
        state = {"codes": self.codes}
        for key in ("absmax_codes", *_STAT_KEYS):
            stored = getattr(self, f"{key}_bits", None) if key in _STAT_KEYS else getattr(self, key, None)
            if stored is not None:
                state[key] = stored.view(torch.float32) if key in _STAT_KEYS else stored
        return state

    @property
    def is_quantized(self) -> bool:
        return self.dense is None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight as a new plain tensor (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if not self.is_quantized:
            return self.dense.detach().to(dtype)
        if self.backend == "bitsandbytes":
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(self.codes, self._bnb_state(dtype))
        return dequantize_nf4(self.quantized_state(), (self.out_features, self.in_features), self.blocksize, dtype)

    @property
    def weight(self) -> torch.Tensor:
        if not self.is_quantized:
            return self.dense
        return _WrittenThrough.wrap(self.dequantize(), self)

    def assign_weight(self, matrix: torch.Tensor) -> None:
        """Replace the weight by ``matrix`` (out, in): kept dense (merge="float") or quantized again."""
        matrix = matrix.detach()
        if not self.is_quantized:
            with torch.no_grad():
                self.dense.copy_(matrix.to(self.dense.dtype))
            return
        if self.merge_policy == "requantize":
            state = _quantize_with(self.backend, matrix.to(self.codes.device), self.blocksize, self.double_quant)
            self.load_quantized(state, device=self.codes.device)
            return
        device = self.codes.device
        for key in [k for k in self._buffers if k.startswith("absmax")]:
            del self._buffers[key]
        del self._parameters["codes"]
        self.dense = nn.Parameter(matrix.to(device, self.compute_dtype).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            out = F.linear(x, self.dense.to(x.dtype))
        elif self.backend == "bitsandbytes":
            import bitsandbytes as bnb

            out = bnb.matmul_4bit(x, self.codes.t(), quant_state=self._bnb_state(x.dtype))
        else:
            out = _DequantizedMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _bnb_state(self, dtype: torch.dtype | None = None):
        """A bitsandbytes QuantState over this layer's own tensors (cheap: no copies)."""
        from bitsandbytes.functional import QuantState

        state = self.quantized_state()
        device = self.codes.device
        code, _ = _table("nf4", device)
        nested = None
        if self.double_quant:
            dynamic, _ = _table("dynamic", device)
            nested = QuantState(absmax=state["absmax_scale"], code=dynamic, blocksize=STATISTICS_BLOCK,
                                dtype=torch.float32)
        return QuantState(absmax=state["absmax_codes"] if self.double_quant else state["absmax"],
                          shape=torch.Size((self.out_features, self.in_features)), code=code,
                          blocksize=self.blocksize, quant_type="nf4", dtype=dtype or self.compute_dtype,
                          offset=state.get("absmax_offset"), state2=nested)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))  # what .to(dtype) / .half() make of floats
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def storage_bytes(self) -> int:
        """Bytes of the weight's storage (codes and statistics, or the dense matrix after a float merge)."""
        if not self.is_quantized:
            return self.dense.numel() * self.dense.element_size()
        return sum(t.numel() * t.element_size() for t in self.quantized_state().values())

    def extra_repr(self) -> str:
        state = (f"nf4, blocksize={self.blocksize}, double_quant={self.double_quant}, backend={self.backend}"
                 if self.is_quantized else f"dense {self.compute_dtype} (merged)")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{state}"


def _quantize_with(backend: str, matrix: torch.Tensor, blocksize: int, double_quant: bool) -> dict[str, torch.Tensor]:
    if backend != "bitsandbytes":
        return quantize_nf4(matrix, blocksize, double_quant)
    import bitsandbytes.functional as bnbf

    source = matrix.contiguous() if matrix.dtype in (torch.float16, torch.bfloat16, torch.float32) else matrix.float()
    codes, state = bnbf.quantize_4bit(source, blocksize=blocksize, compress_statistics=double_quant,
                                      quant_type="nf4", quant_storage=torch.uint8)
    if not double_quant:
        return {"codes": codes, "absmax": state.absmax.float()}
    return {"codes": codes, "absmax_codes": state.absmax, "absmax_scale": state.state2.absmax.float(),
            "absmax_offset": torch.as_tensor(state.offset, dtype=torch.float32, device=codes.device)}


class _WrittenThrough(torch.Tensor):
    """A dequantized weight whose in-place writes are handed to its NF4Linear.

    core.layers.set_weight_matrix (merge, IA³/SSF folding) and PaCA's merge write through
    ``weight_matrix(layer)`` in place; on a plain temporary such a write would vanish. A write is
    recognised by the tensor's version counter, so ``requires_grad_`` and friends are not writes.
    Every other operation runs on, and returns, plain tensors.
    """

    _owner: weakref.ref

    @staticmethod
    def wrap(tensor: torch.Tensor, owner: NF4Linear) -> _WrittenThrough:
        wrapped = tensor.as_subclass(_WrittenThrough)
        wrapped._owner = weakref.ref(owner)
        return wrapped

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        target = args[0] if args and isinstance(args[0], cls) else None
        if target is not None and getattr(func, "__self__", None) is torch.Tensor.data:
            return target  # .data of a fresh, grad-free copy is the copy itself
        with torch._C.DisableTorchFunctionSubclass():
            version = target._version if target is not None else 0
            result = func(*args, **(kwargs or {}))
            written = target is not None and target._version != version
        if written:
            owner = target._owner()
            if owner is None:
                raise RuntimeError("the NF4Linear this dequantized weight came from no longer exists")
            owner.assign_weight(target.as_subclass(torch.Tensor))
        return result


# --------------------------------------------------------------------------------------------------
# Whole models


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"quantize: backend must be one of {BACKENDS}, got {backend!r}")
    available = device.type == "cuda" and bitsandbytes_available()
    if backend == "bitsandbytes" and not available:
        raise ConfigError("quantize: backend='bitsandbytes' needs the weights on a CUDA device and the "
                          "bitsandbytes package (pip install 'peftlab[quant]'); backend='simulated' runs anywhere")
    if backend == "auto":
        return "bitsandbytes" if available else "simulated"
    return backend


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library raising at import
        return False
    return True


def _targets(model: nn.Module, targets) -> list[str]:
    def quantizable(module: nn.Module) -> bool:
        return is_linear(module) and not isinstance(module, NF4Linear)

    if targets is None:  # QLoRA: every linear layer of the body; the output head stays 16-bit
        heads = output_head_paths(model)
        return [p for p, m in model.named_modules() if p and quantizable(m) and p not in heads]
    return resolve_targets(model, targets, accepts=quantizable, default_roles=(), method="quantize",
                           kind="linear")


@overload
def quantize(model: nn.Module, method: str = ..., *, keep_reference: Literal[False] = ..., **options) -> nn.Module: ...
@overload
def quantize(model: nn.Module, method: str = ..., *, keep_reference: Literal[True], **options) -> References: ...


def quantize(model: nn.Module, method: str = "nf4", *, targets=None, blocksize: int = 64, double_quant: bool = True,
             backend: str = "auto", merge: str = "float", keep_reference: bool = False,
             reference_device: str | torch.device | None = "cpu"):
    """Replace the linear layers ``targets`` of ``model`` (in place) by ``NF4Linear`` layers.

    ``targets``: None for every linear layer but the output head, else as ``peftlab.adapt``'s (module
    path suffixes, a regex, "all-linear"). Layers are replaced one at a time, so the peak memory is
    the model plus a few fp32 copies of one layer's weight. Returns the model, or with ``keep_reference=True`` the
    full-precision weights {path: (out, in) tensor} on ``reference_device`` (None: where they were),
    for qwha's quantization-aware init; nothing keeps them once the caller drops the dict.
    Quantize before attaching adapters.
    """
    if method != "nf4":
        raise ConfigError(f"quantize: unknown method {method!r}; supported: 'nf4'")
    if merge not in MERGES:
        raise ConfigError(f"quantize: merge must be one of {MERGES}, got {merge!r}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ConfigError(f"quantize: blocksize must be a power of two >= 2, got {blocksize!r}")
    book = book_of(model)
    if book is not None and book.attachments:
        raise ConfigError("quantize: the model already has adapters; quantize the base first, then adapt")
    plan = {path: _resolve_backend(backend, weight_matrix(model.get_submodule(path)).device)
            for path in _targets(model, targets)}  # refuse before the first layer is replaced
    references: References = {}
    for path, chosen in plan.items():
        parent_path, _, leaf = path.rpartition(".")
        old = model.get_submodule(path)
        if keep_reference:
            matrix = weight_matrix(old).detach()
            references[path] = matrix.to(reference_device) if reference_device is not None else matrix
        new = NF4Linear.from_linear(old, blocksize=blocksize, double_quant=double_quant, backend=chosen, merge=merge)
        new.train(old.training)
        setattr(model.get_submodule(parent_path), leaf, new)
    return references if keep_reference else model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every NF4Linear of ``model`` back into an nn.Linear (in place; dense weights in ``dtype``,
    default each layer's compute dtype), e.g. to save or export a merged model."""
    book = book_of(model)
    if book is not None and book.attachments:
        raise ConfigError("dequantize: merge or delete the adapters first")
    for path, module in list(model.named_modules()):
        if not isinstance(module, NF4Linear):
            continue
        matrix = module.dequantize(dtype)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta", dtype=matrix.dtype)
        dense.weight = nn.Parameter(matrix, requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(matrix.dtype), requires_grad=module.bias.requires_grad)
        dense.train(module.training)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, dense)
    return model


def footprint(model: nn.Module) -> dict[str, int]:
    """Bytes held by the NF4 layers' weights, and what the same weights take dense (compute dtype)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return {
        "layers": len(layers),
        "weights": sum(m.in_features * m.out_features for m in layers),
        "stored_bytes": sum(m.storage_bytes() for m in layers),
        "dense_bytes": sum(m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8 for m in layers),
    }
