"""Uniform access to the layers adapters attach to (nn.Linear, transformers' Conv1D, norms, embeddings).

Methods always see a weight as a matrix of shape (out, in): transformers' Conv1D (GPT-2) stores its
weight transposed, and these helpers hide that.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.kernels.merged_weight import merged_weight, merged_weight_direct

try:  # transformers is a hard dependency, but keep the core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm-like modules, including the RMSNorm classes that transformers defines per model."""
    if isinstance(module, _NORM_TYPES):
        return True
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) and isinstance(getattr(module, "weight", None), torch.Tensor)


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) widths: of a linear-like module; (vocabulary, width) of an embedding; (d, d) of a
    module with a 1-D weight such as a norm."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0], weight.shape[0]
    raise TypeError(f"cannot tell the input and output widths of {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view; for Conv1D, a transposed view of the stored tensor."""
    return module.weight.T if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix into the module's weight, in the module's layout and dtype."""
    with torch.no_grad():
        weight_matrix(module).copy_(matrix.to(module.weight.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the input's dtype: adapter parameters are kept in fp32 and cast per call."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return nn.functional.linear(x, weight, bias)


def add_product(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out + scale · x weightᵀ as one addmm: no separate pass over the output in forward or backward. A rank-one
    product (x one column wide) is an outer product instead (``_AddOuter``)."""
    flat_out, flat_x, weight = out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), weight.to(x.dtype)
    if flat_x.shape[-1] == 1 and flat_out.dtype == flat_x.dtype:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (flat_out, flat_x, weight)):
            return _AddOuter.apply(flat_out, flat_x, weight, scale).view(out.shape)
        return torch.addcmul(flat_out, flat_x, weight.T, value=scale).view(out.shape)
    return torch.addmm(flat_out, flat_x, weight.T, alpha=scale).view(out.shape)


class _AddOuter(torch.autograd.Function):
    """out + s·u vᵀ for columns u (tokens x 1) and v (width x 1): forward as one broadcast multiply-add, as
    cuBLAS's GEMM of inner size 1 runs far below memory speed (217 µs for 8192 x 8192 bf16 on an H200, where
    reading and writing the output takes about 60); backward as two matrix-vector products, one pass over
    the gradient each (autograd's own for the broadcast would first write g ⊙ v, a second output-sized
    tensor, then sum it)."""

    @staticmethod
    def forward(ctx, out, u, v, scale):
        ctx.save_for_backward(u, v)
        ctx.scale = scale
        return torch.addcmul(out, u, v.T, value=scale)

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        _, needs_u, needs_v, _ = ctx.needs_input_grad
        grad_u = torch.mm(grad, v).mul_(ctx.scale) if needs_u else None
        grad_v = torch.mm(grad.T, u).mul_(ctx.scale) if needs_v else None
        return grad, grad_u, grad_v, None


def low_rank_update(layer: nn.Module, x: torch.Tensor, base, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                    *, folded: bool, dropout: nn.Module | None = None) -> torch.Tensor:
    """base(x) + s·B A h, h = dropout(x): as the layer's one product (W + s·B A) x + b when ``folded`` (the adapter
    is alone on a plain layer, core.inject.folds_into), the dropout is not dropping (else the update sees
    another input than W) and the tokens make it pay (``folds_low_rank``); else the sum rides on the B-GEMM
    (one addmm)."""
    dropping = isinstance(dropout, nn.Dropout) and dropout.training
    if folded and not dropping and folds_low_rank(layer, x):
        return folded_low_rank(layer, x, a, b, scale)
    return add_product(base(x), linear(dropout(x) if dropping else x, a), b, scale)


def apply_dense_delta(layer: nn.Module, x: torch.Tensor, base, delta: torch.Tensor, *, folded: bool,
                      scale: float = 1.0, adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's output with a dense update s·ΔW: (W + s·ΔW) x + b in the layer's one product when ``folded``
    (core.inject.folds_into), else base(x) + s·ΔW h as one addmm (h: ``adapter_input``, x when None)."""
    if folded:
        return linear(x, torch.add(weight_matrix(layer), delta, alpha=scale), layer.bias)
    return add_product(base(x), x if adapter_input is None else adapter_input, delta, scale)


def apply_factored_delta(layer: nn.Module, x: torch.Tensor, base, left: torch.Tensor, right: torch.Tensor, *,
                         folded: bool, scale: float = 1.0, adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    """``apply_dense_delta`` for ΔW = left · right given as its factors. Folded, W + s·left·right is one addmm:
    no pass adding ΔW to W in forward, and backward scales the factors' gradients, not the weight-sized one."""
    if folded:
        weight = weight_matrix(layer)
        merged = torch.addmm(weight, left.to(weight.dtype), right.to(weight.dtype), alpha=scale)
        return linear(x, merged, layer.bias)
    return apply_dense_delta(layer, x, base, left @ right, folded=False, scale=scale, adapter_input=adapter_input)


def dense_delta_products(folded: bool, backward: bool) -> int:
    """Products of the layer's size (tokens·in·out multiply-adds) a dense ΔW adds to one call: ΔW x, its input
    gradient and ΔW's gradient; folded into W's own product, only ΔW's gradient is extra."""
    return int(backward) if folded else 1 + 2 * int(backward)


def _folded_product(x, weight, bias, a, b):
    """Run eagerly only (the autograd function, the opaque operator), so the merged weight skips its
    operator's dispatch; backward's formula is traced under compile and keeps the operator."""
    return nn.functional.linear(x, merged_weight_direct(weight, b, a), bias)


def _folded_grads(grad, x, merged, a, b, needs_a: bool, needs_b: bool):
    """Gradients of x (W + B A)ᵀ + b for x, W, b, A and B: x's through ``merged`` (W + B A; None: not needed), A's
    and B's from the low-rank products Bᵀ gᵀ x and gᵀ (x Aᵀ)."""
    flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = grad @ merged if merged is not None else None
    grad_a = (flat_grad @ b).T @ flat_x if needs_a else None
    grad_b = flat_grad.T @ (flat_x @ a.T) if needs_b else None
    return grad_x, None, None, grad_a, grad_b


def _folded_backward(ctx, grad):
    """Backward of the fold that saved W (the autograd function and the operator alike): W + B A built again."""
    x, weight, a, b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    return _folded_grads(grad, x, merged_weight(weight, b, a) if needs[0] else None, a, b, needs[3], needs[4])


class _FoldedLowRank(torch.autograd.Function):
    """y = x (W + B A)ᵀ + b for a frozen W, b: one product of the layer's size each way, no dense gradient.

    Forward and the input gradient use the merged matrix W + B A (built twice: a pass over the weight is
    cheaper than passes over the activations once tokens exceed about the layer's width). Saved: x (kept
    anyway), W, A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b):
        ctx.save_for_backward(x, weight, a, b)
        return _folded_product(x, weight, bias, a, b)

    @staticmethod
    def backward(ctx, grad):
        return _folded_backward(ctx, grad)


class _KeptFold(torch.autograd.Function):
    """The fold saving W + B A for backward instead of W, for compiled code that may keep it
    (``keeps_merged_weight``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b):
        merged = merged_weight(weight, b, a)
        ctx.save_for_backward(x, merged, a, b)
        return nn.functional.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        x, merged, a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return _folded_grads(grad, x, merged if needs[0] else None, a, b, needs[3], needs[4])


# The same function as an operator opaque to torch.compile, which then builds W + B A again in backward. Traced
# through, backward's W + B A is the same computation as forward's and is merged with it: the compiled graph
# keeps forward's to backward, a second copy of every adapted weight (tests/methods/test_llm_adapters.py).
@torch.library.custom_op("peftlab::folded_low_rank", mutates_args=())
def _folded_low_rank_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor) -> torch.Tensor:
    return _folded_product(x, weight, bias, a, b)


@_folded_low_rank_op.register_fake
def _(x, weight, bias, a, b):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _save_folded_inputs(ctx, inputs, output):
    x, weight, _, a, b = inputs
    ctx.save_for_backward(x, weight, a, b)


_folded_low_rank_op.register_autograd(_folded_backward, setup_context=_save_folded_inputs)


def folded_low_rank(layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                    gain: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output with a low-rank update, (W + s·B A) x + b, or g ⊙ (W + s·B A) x + b with a per-output
    ``gain``, as one product of the layer's size: for adapters alone on a plain, frozen layer
    (``folds_low_rank``). A, B and the gain may be kept in a wider dtype than x. Eager calls take an autograd
    function (cheaper to dispatch); compiled code keeps W + s·B A for backward where it may
    (``keeps_merged_weight``), else takes the opaque operator that builds it again."""
    dtype = x.dtype
    if not torch.compiler.is_compiling():
        folded = _FoldedLowRank.apply
    else:
        folded = _KeptFold.apply if keeps_merged_weight(weight_matrix(layer), x) else _folded_low_rank_op
    bias = layer.bias if gain is None else None
    product = folded(x, weight_matrix(layer), bias, a.to(dtype), (b * scale).to(dtype))
    if gain is None:
        return product
    gain = gain.to(dtype)
    return product * gain if layer.bias is None else torch.addcmul(layer.bias, product, gain)


def keeps_merged_weight(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether compiled code may keep the fold's W + s·B A from forward to backward instead of building it again:
    not under an activation budget (peftlab.train.loss.compile_blocks; gradient-checkpointed blocks have budget
    0), which asks for memory over speed, and only where the copy is no larger than the layer's input x, which
    backward keeps anyway (on Llama-3.2-1B at 8 x 1024 tokens, every projection: 1.8 GiB for 2% of speed)."""
    return torch._functorch.config.activation_memory_budget >= 1.0 and weight.numel() <= x.numel()


def frozen_in(layer: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the layer's weight and bias are frozen and of ``dtype``: an update may then be merged into its
    product, which gives them no gradient and runs in their dtype."""
    weight, bias = layer.weight, layer.bias
    if weight.requires_grad or weight.dtype != dtype:
        return False
    return bias is None or (not bias.requires_grad and bias.dtype == dtype)


def folds_low_rank(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether a low-rank update on ``layer`` is cheaper merged into W for this input: the weight and bias are
    frozen and share x's dtype outside autocast, and there are at least as many tokens as the harmonic mean of
    the layer's widths (building W + B A twice then moves less memory than the low-rank path's extra passes
    over the activations). The caller checks that the adapter is alone on the layer (core.inject.folds_into)."""
    if not frozen_in(layer, x.dtype) or torch.is_autocast_enabled(x.device.type):
        return False
    fan_out, fan_in = weight_matrix(layer).shape
    return x.numel() // fan_in * (fan_in + fan_out) >= 2 * fan_in * fan_out
