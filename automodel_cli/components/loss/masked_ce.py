"""Token-level cross-entropy over the trained (non -100) positions: the reference loss.

Why a sum divided by ``num_label_tokens`` rather than a mean: with gradient accumulation the
trainer passes the number of label tokens in the *whole* optimizer step, so every token weighs
the same no matter how tokens fall into micro-batches (a per-micro-batch mean would over-weight
short micro-batches and make results depend on the micro-batch size).

Memory: ``F.cross_entropy`` keeps an fp32 ``log_softmax`` of every row for backward and the
backward pass builds two more ``[rows, vocab]`` tensors. That is fine at small vocabularies;
``chunked_ce`` and ``linear_ce`` exist for large ones (docs/performance.md has the numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel_cli.components.loss.targets import IGNORE_INDEX, as_rows


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose target is not -100, divided by
    ``num_label_tokens`` (default: the number of such positions here).

    ``logits`` is ``[batch, seq, vocab]`` with ``labels`` ``[batch, seq]`` aligned with the inputs
    (position ``t`` predicts ``labels[t + 1]``), or ``[N, vocab]`` rows with ``[N]`` targets that
    are already shifted (see ``targets.py``). Computed in fp32 whatever the logits' dtype.
    """
    rows, targets = as_rows(logits, labels)
    total = F.cross_entropy(rows.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_label_tokens is None:
        num_label_tokens = (targets != IGNORE_INDEX).sum()
    return total / torch.as_tensor(num_label_tokens, dtype=total.dtype, device=total.device).clamp(min=1)
