"""Cross-entropy over full logits, computed a chunk of rows at a time.

Why: ``masked_ce`` upcasts the whole ``[rows, vocab]`` logits to fp32 and ``F.cross_entropy``
saves an fp32 ``log_softmax`` of all of it for backward; its backward then allocates two more
full-size tensors. Here the forward keeps only the per-row log-sum-exp (``[rows]`` floats) next
to the logits it was given, and the backward writes the gradient chunk by chunk straight into
one tensor of the logits' dtype; fp32 exists for one chunk at a time. The logits themselves are
still materialised (use ``linear_ce`` to avoid even that).

Math per row with target ``y`` (``lse = log sum_v exp(z_v)``): loss ``lse - z_y``; gradient
``softmax(z) - onehot(y)``, zero for ignored rows, times ``1 / num_label_tokens``.
"""

from __future__ import annotations

import torch

from automodel_cli.components.loss.targets import IGNORE_INDEX, as_rows, normaliser, rows_per_chunk


def chunked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same value and gradient as ``masked_cross_entropy`` (same layouts and normaliser), with
    ``chunk_size`` rows upcast to fp32 at a time (null: about 2**25 values per chunk)."""
    rows, targets = as_rows(logits, labels)
    scale = 1.0 / normaliser(num_label_tokens, targets)
    chunk = rows_per_chunk(chunk_size, rows.size(-1))
    return _ChunkedCrossEntropy.apply(rows, targets, scale, chunk)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``scale * sum_i (lse_i - z_i[y_i])`` over rows with ``y_i != -100``."""

    @staticmethod
    def forward(ctx, logits, targets, scale, chunk):  # type: ignore[override]
        n = logits.size(0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk):
            z = logits[start:start + chunk].float()
            t = targets[start:start + chunk]
            valid = t != IGNORE_INDEX
            chunk_lse = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, chunk_lse - picked, 0.0).sum()
            lse[start:start + chunk] = chunk_lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = torch.empty_like(logits)
        factor = grad_total.float() * ctx.scale
        for start in range(0, logits.size(0), ctx.chunk):
            end = start + ctx.chunk
            t = targets[start:end]
            valid = t != IGNORE_INDEX
            # out of place: for fp32 logits .float() is the saved tensor itself
            g = (logits[start:end].float() - lse[start:end].unsqueeze(1)).exp_()
            g.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -valid.unsqueeze(1).to(g.dtype))
            g.mul_(torch.where(valid, factor, 0.0).unsqueeze(1))
            grad[start:end] = g
        return grad, None, None, None
