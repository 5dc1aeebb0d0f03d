"""Losses and metrics of sequence classifiers and reward models.

A reward model is trained with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``
(the negative log-likelihood that the chosen answer is preferred); it is judged by pairwise
accuracy (the share of pairs with ``r_chosen > r_rejected``) and the mean margin
``r_chosen - r_rejected``. A classifier is trained with cross-entropy and judged by accuracy and
macro F1: the mean over classes of ``2 TP / (2 TP + FP + FN)``, over the classes that occur in
the labels or the predictions (a class absent from both says nothing about the model).
"""

from __future__ import annotations

from typing import Any

#: Columns of ``class_counts``: true positives, false positives, false negatives of each class.
TP, FP, FN = 0, 1, 2


def bradley_terry_loss(chosen: Any, rejected: Any) -> Any:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected)`` (numerically stable)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen.float() - rejected.float())


def class_counts(predicted: Any, target: Any, num_classes: int) -> Any:
    """``[num_classes, 3]`` counts (TP, FP, FN) of ``predicted`` against ``target`` (class ids)."""
    import torch

    counts = torch.zeros((num_classes, 3), dtype=torch.float64, device=predicted.device)
    hit = predicted == target
    ones = torch.ones_like(target, dtype=torch.float64)
    counts[:, TP].index_add_(0, target[hit], ones[hit])
    counts[:, FP].index_add_(0, predicted[~hit], ones[~hit])
    counts[:, FN].index_add_(0, target[~hit], ones[~hit])
    return counts


def macro_f1(counts: Any) -> float:
    """Macro F1 of ``class_counts`` (summed over batches and ranks)."""
    denominators = 2 * counts[:, TP] + counts[:, FP] + counts[:, FN]
    present = denominators > 0
    if not bool(present.any()):
        return 0.0
    return float((2 * counts[present, TP] / denominators[present]).mean())


def format_classify_eval(result: dict[str, float]) -> str:
    """One line of validation metrics (``eval_loss``, ``eval_accuracy``, then ``eval_f1`` or
    ``eval_margin``)."""
    parts = [f"loss {result['eval_loss']:.4f}", f"accuracy {result['eval_accuracy']:.1%}"]
    if "eval_f1" in result:
        parts.append(f"macro F1 {result['eval_f1']:.3f}")
    if "eval_margin" in result:
        parts[1] = f"pairwise accuracy {result['eval_accuracy']:.1%}"
        parts.append(f"mean margin {result['eval_margin']:.3f}")
    return ", ".join(parts)
