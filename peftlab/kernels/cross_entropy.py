"""Fused output-head + cross-entropy for a frozen head: loss and d(loss)/d(hidden) in one pass.

    hidden (N x d) ──► chunk ──► logits = hidden·Wᵀ (chunk x V) ──► softmax, loss ──► dlogits·W
                                                         └── freed before the next chunk

The forward walks the supervised tokens in chunks; for each it computes the logits, the summed
cross-entropy and already the gradient with respect to the hidden states (softmax − one-hot)·W,
then drops the logits. Backward only scales the stored gradient. Peak memory is one chunk of
logits instead of N x V, and the head matmul runs twice (forward, input gradient) rather than three
times as with recomputation. The head weight gets no gradient: PEFT methods keep it frozen.

Optional logit post-processing as in some model families: division by a constant (Granite) and
tanh soft-capping (Gemma 2/3), both differentiated exactly.
"""

from __future__ import annotations

import torch


def _chunk_loss_and_grad(logits, targets, divisor, softcap, need_grad: bool):
    """Summed cross-entropy of one chunk of logits and, if asked, d(loss)/d(logits) in the head's dtype."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if divisor:
        z = z / divisor
    if softcap:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    log_z = torch.logsumexp(z, dim=-1)
    total = (log_z - z.gather(1, targets[:, None]).squeeze(1)).sum()
    if not need_grad:
        return total, None
    is_target = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    grad = torch.exp(z - log_z[:, None]) - is_target.to(z.dtype)
    if softcap:
        grad = grad * (1.0 - capped.pow(2))
    if divisor:
        grad = grad / divisor
    return total, grad.to(logits.dtype)


def _chunk_function(hidden: torch.Tensor):
    """For logits like ``hidden`` (same device and dtype): the Triton kernel (kernels.cross_entropy_triton:
    two passes over the logits, the gradient written in place) for half and single precision on CUDA; this
    module's reference elsewhere."""
    if hidden.device.type != "cuda" or hidden.dtype == torch.float64:
        return _chunk_loss_and_grad
    try:
        from peftlab.kernels.cross_entropy_triton import chunk_loss_and_grad
    except ImportError:  # CUDA without Triton (not a torch wheel for Linux)
        return _chunk_loss_and_grad
    return chunk_loss_and_grad


def _chunk_loss(hidden, weight, targets, loss_and_grad, divisor, softcap, grad_hidden: torch.Tensor | None):
    """One chunk's summed loss; its hidden-state gradient, if asked, written into ``grad_hidden``. The chunk's
    logits live only in this call: a loop variable would keep them until the next chunk's logits exist,
    doubling the head's peak (2 GiB at 4096 tokens of a 128k vocabulary)."""
    logits = hidden @ weight.T
    part, grad = loss_and_grad(logits, targets, divisor, softcap, grad_hidden is not None)
    if grad_hidden is not None:
        torch.mm(grad.to(weight.dtype), weight, out=grad_hidden)
    return part


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, divisor, softcap):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        need_grad = hidden.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        loss_and_grad = _chunk_function(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += _chunk_loss(hidden[rows], weight, targets[rows], loss_and_grad, divisor, softcap,
                                 None if grad_hidden is None else grad_hidden[rows])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        scaled = None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype)
        return scaled, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               chunk: int = 4096, divisor: float | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (weight frozen)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError("hidden must be (tokens, width) and targets (tokens,)")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _FusedLinearCrossEntropy.apply(hidden, weight.detach(), targets, chunk, divisor, softcap)
