"""Fused LM head + cross-entropy: the ``[tokens, vocab]`` logits never exist in full, in forward
or backward (the chunked machinery and why it pays are in ``fused_linear.py``).

Registered as ``linear_ce`` by ``builtin.LINEAR_CE``: a fused loss whose logits fallback is
``chunked_ce`` (when the model's head cannot be fused the logits exist anyway, so at least avoid
their fp32 copies) and whose distillation counterpart is ``kd.linear_distillation_loss``.
"""

from __future__ import annotations

import torch

from automodel_cli.components.loss.fused_linear import cross_entropy_chunk, fused_linear_loss
from automodel_cli.components.loss.targets import as_rows, normaliser, rows_per_chunk


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

    def chunk_loss(z: torch.Tensor, start: int, end: int, want_grad: bool):
        total, grad = cross_entropy_chunk(z, targets[start:end], scale, want_grad)
        return total.reshape(1), grad

    return fused_linear_loss(rows, weight, bias, chunk_loss, 1, rows_per_chunk(chunk_size, weight.size(0)))[0]
