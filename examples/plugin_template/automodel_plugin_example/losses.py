"""A label-smoothed cross-entropy with the same contract as automodel's ``masked_ce``."""

from __future__ import annotations

SMOOTHING = 0.1


def label_smoothed_cross_entropy(logits, labels, num_label_tokens=None):
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(
        shift_logits, shift_labels, ignore_index=-100, reduction="sum", label_smoothing=SMOOTHING
    )
    if num_label_tokens is None:
        num_label_tokens = (shift_labels != -100).sum()
    return total / torch.as_tensor(num_label_tokens, dtype=total.dtype).clamp(min=1)
