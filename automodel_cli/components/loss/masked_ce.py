"""Token-level cross-entropy over the trained (non -100) positions.

Why a sum divided by ``num_label_tokens`` rather than a mean: with gradient accumulation the
trainer passes the number of label tokens in the *whole* optimizer step, so every token weighs
the same no matter how tokens fall into micro-batches (a per-micro-batch mean would over-weight
short micro-batches and make results depend on the micro-batch size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    ``logits`` is ``[batch, seq, vocab]`` and ``labels`` ``[batch, seq]`` aligned with the inputs
    (position ``t`` of ``logits`` predicts ``labels[t + 1]``). ``num_label_tokens`` is the
    normaliser; by default the number of label tokens in this batch.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_label_tokens is None:
        num_label_tokens = (shift_labels != IGNORE_INDEX).sum()
    return total / torch.as_tensor(num_label_tokens, dtype=total.dtype, device=total.device).clamp(min=1)
