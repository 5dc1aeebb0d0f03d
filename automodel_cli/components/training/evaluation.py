"""Validation: loss, token accuracy and exact-match accuracy in one teacher-forced pass.

Exact match here means greedy decoding would reproduce the whole reference completion: under
teacher forcing, if the argmax at every trained position equals the reference token, greedy
generation follows exactly the reference path, and vice versa. So one forward pass gives the
same answer as running ``generate`` on every sample, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

IGNORE_INDEX = -100


def evaluate(model: Any, batches: Iterable[dict[str, Any]], forward: Callable[[Any, dict], Any]) -> dict[str, float]:
    """Mean token loss, token accuracy and per-sample exact match over ``batches``."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    loss_sum = 0.0
    tokens = correct_tokens = samples = exact = 0
    with torch.no_grad():
        for batch in batches:
            logits = forward(model, batch)
            labels = batch["labels"][:, 1:].to(logits.device)
            logits = logits[:, :-1, :].float()
            mask = labels != IGNORE_INDEX
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").item()
            hits = (logits.argmax(-1) == labels) & mask
            tokens += int(mask.sum())
            correct_tokens += int(hits.sum())
            for row_hits, row_mask in _documents(hits, mask, batch):
                if row_mask.any():
                    samples += 1
                    exact += int(bool((row_hits == row_mask).all()))
    if was_training:
        model.train()
    return {
        "eval_loss": loss_sum / max(1, tokens),
        "eval_token_accuracy": correct_tokens / max(1, tokens),
        "eval_exact_match": exact / max(1, samples),
        "eval_samples": samples,
    }


def _documents(hits: Any, mask: Any, batch: dict[str, Any]):
    """Per-document (hits, mask) rows; packed rows are split at document starts."""
    position_ids = batch.get("position_ids")
    for row in range(hits.size(0)):
        if position_ids is None:
            yield hits[row], mask[row]
            continue
        # position t of the shifted tensors predicts token t + 1; a new document starts where
        # the position id of token t + 1 is 0.
        starts = (position_ids[row, 1:] == 0).nonzero().flatten().tolist()
        bounds = [0, *starts, hits.size(1)]
        for begin, end in zip(bounds, bounds[1:]):
            if end > begin:
                yield hits[row, begin:end], mask[row, begin:end]


def format_eval(result: dict[str, float]) -> str:
    """One line for a validation result of ``evaluate`` (and of ``generation`` when it has one)."""
    from automodel_cli.components.training.generation import GENERATED, format_generation

    line = (f"eval loss {result['eval_loss']:.4f}, exact match {result['eval_exact_match']:.1%}, "
            f"token accuracy {result['eval_token_accuracy']:.1%} ({result['eval_samples']} samples)")
    return f"{line}; {format_generation(result)}" if GENERATED in result else line
