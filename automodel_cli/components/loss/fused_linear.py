"""The LM head and a loss, chunk by chunk: the machinery of ``linear_ce`` and of
``kd.linear_distillation_loss``, so that the ``[tokens, vocab]`` logits never exist in full.

Why: at a large vocabulary the logits dominate a training step's memory. For Llama 3's 128k
vocabulary, 4 x 1024 tokens give 2.1 GB of fp32 logits, and the usual path holds three or four
tensors of that size at its peak (logits, ``log_softmax``, their gradients), more than the
whole decoder of a small model. Here the forward pass walks over chunks of rows and, for each,
computes the chunk's logits, the loss terms, and at once the gradients with respect to the
hidden states and the head's weight (and bias); the chunk's logits are then dropped. The
backward pass only scales the stored gradients by the incoming gradient. The peak is one chunk
of ``[rows, vocab]`` plus gradients the size of the hidden states and the head.

Computing the gradients in the forward pass (as Liger-Kernel's fused linear cross-entropy does)
costs three matmuls per chunk: the same as autograd's forward and backward, and one fewer than
recomputing the logits in backward. It is done only when a gradient is needed (not under
``torch.no_grad`` and only for inputs that require one: no weight gradient for a frozen head).

Precision follows autocast: under autocast the chunk matmuls run in the autocast dtype (as
``lm_head`` would); the softmax, the loss and the weight-gradient accumulation are fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from automodel_cli.components.loss.targets import IGNORE_INDEX


def cross_entropy_chunk(z: torch.Tensor, targets: torch.Tensor, scale: float, want_grad: bool):
    """``(scale * sum of the rows' cross-entropy, its gradient with respect to z or None)`` for
    one chunk of fp32 logits ``z`` ``[rows, vocab]``; rows whose target is -100 count nothing.
    The gradient ``scale * (softmax(z) - onehot(y))`` is built in ``z``'s storage."""
    valid = targets != IGNORE_INDEX
    index = targets.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    total = torch.where(valid, lse - z.gather(1, index).squeeze(1), 0.0).sum() * scale
    if not want_grad:
        return total, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, index, -valid.unsqueeze(1).to(grad.dtype))
    grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))
    return total, grad


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      chunk_loss: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], num_terms: int,
                      chunk: int) -> torch.Tensor:
    """``[num_terms]`` fp32 loss terms computed from the logits ``hidden @ weight.T + bias``
    ``chunk`` rows at a time, never all of them; only the first term is differentiable.

    ``chunk_loss(z, start, end, want_grad)`` receives the fp32 logits ``z`` of rows
    ``start:end`` (it may overwrite them) and returns the chunk's ``[num_terms]`` contributions
    and, when ``want_grad``, the gradient of the first term with respect to ``z``. The matmuls
    follow autocast like the LM head would.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearLoss.apply(hidden, weight, bias, chunk_loss, num_terms, chunk, dtype,
                                      torch.is_grad_enabled())


class _FusedLinearLoss(torch.autograd.Function):
    """Loss terms from ``z = hidden @ weight.T + bias`` chunk by chunk; the gradients of the first
    term are computed in forward and saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, num_terms, chunk, dtype, grad_enabled):  # type: ignore[override]
        n = hidden.size(0)
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        want_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        want_grad = want_h or want_w or want_b
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        terms = torch.zeros(num_terms, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)
            z = F.linear(h, w, b).float()  # [rows, vocab]: the only vocabulary-sized input
            chunk_terms, g = chunk_loss(z, start, end, want_grad)
            terms += chunk_terms
            if not want_grad:
                continue
            if want_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if want_h:
                grad_h[start:end] = g @ w
            if want_w:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return terms

    @staticmethod
    def backward(ctx, grad_terms):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_total = grad_terms[0]  # the other terms are reported values, not part of the loss
        # The stored gradients belong to this call alone: scale them in place.
        out_h = grad_h.mul_(grad_total.to(h_dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(grad_total).to(w_dtype) if grad_w is not None else None
        out_b = grad_b.mul_(grad_total).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None
