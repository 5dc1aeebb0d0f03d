"""Fused LM head + cross-entropy: the ``[tokens, vocab]`` logits never exist in full.

Why: at a large vocabulary the logits dominate a training step's memory. For Llama 3's 128k
vocabulary, 4 x 1024 tokens give 2.1 GB of fp32 logits, and the usual path holds three or four
tensors of that size at its peak (logits, ``log_softmax``, their gradients), more than the
whole decoder of a small model. Here the forward pass walks over chunks of rows and, for each,
computes the chunk's logits, their log-sum-exp, the loss, and at once the gradients with
respect to the hidden states and the head's weight (and bias); the chunk's logits are then
dropped. The backward pass only scales the stored gradients by the incoming gradient. The peak
is one chunk of ``[rows, vocab]`` plus gradients the size of the hidden states and the head.

Computing the gradients in the forward pass (as Liger-Kernel's fused linear cross-entropy does)
costs three matmuls per chunk: the same as autograd's forward and backward, and one fewer than
recomputing the logits in backward. It is done only when a gradient is needed (not under
``torch.no_grad`` and only for inputs that require one: no weight gradient for a frozen head).

Precision follows autocast: under autocast the chunk matmuls run in the autocast dtype (as
``lm_head`` would); the softmax, the loss and the weight-gradient accumulation are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel_cli.components.loss.chunked_ce import chunked_cross_entropy
from automodel_cli.components.loss.targets import IGNORE_INDEX, as_rows, normaliser, rows_per_chunk


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``masked_cross_entropy(F.linear(hidden, weight, bias), labels, num_label_tokens)`` without
    materialising the logits, in forward or backward.

    ``hidden`` is ``[batch, seq, hidden]`` with ``[batch, seq]`` labels aligned with the inputs,
    or ``[N, hidden]`` rows with ``[N]`` already shifted targets; ``weight`` is the LM head's
    ``[vocab, hidden]``. ``chunk_size`` rows are processed at a time (null: about 2**25 logits
    per chunk).
    """
    rows, targets = as_rows(hidden, labels)
    scale = 1.0 / normaliser(num_label_tokens, targets)
    chunk = rows_per_chunk(chunk_size, weight.size(0))
    device_type = rows.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(rows, weight, bias, targets, scale, chunk, dtype,
                                         torch.is_grad_enabled())


#: Takes hidden states and the head's weight instead of logits (docs/plugins.md, losses).
linear_cross_entropy.fused = True
#: Used when the model's head cannot be fused (soft-capped or scaled logits, a tensor-parallel or
#: adapted ``lm_head``): the logits then exist anyway, so at least avoid their fp32 copies.
linear_cross_entropy.logits_loss = chunked_cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """``scale * sum_i (lse_i - z_i[y_i])`` with ``z = hidden @ weight.T + bias`` chunk by chunk;
    gradients are computed in forward and saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk, dtype, grad_enabled):  # type: ignore[override]
        n = hidden.size(0)
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        want_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)
            z = F.linear(h, w, b).float()  # [rows, vocab]: the only vocabulary-sized tensor
            t = targets[start:end]
            valid = t != IGNORE_INDEX
            index = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1)
            total += torch.where(valid, lse - z.gather(1, index).squeeze(1), 0.0).sum()
            if not (want_h or want_w or want_b):
                continue
            # d loss / d z = scale * (softmax(z) - onehot(y)) on trained rows, 0 elsewhere; in place.
            g = z.sub_(lse.unsqueeze(1)).exp_()
            g.scatter_add_(1, index, -valid.unsqueeze(1).to(g.dtype))
            g.mul_((valid.to(g.dtype) * scale).unsqueeze(1))
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
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # The stored gradients belong to this call alone: scale them in place.
        out_h = grad_h.mul_(grad_total.to(h_dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(grad_total).to(w_dtype) if grad_w is not None else None
        out_b = grad_b.mul_(grad_total).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None
