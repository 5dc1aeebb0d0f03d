"""What every built-in loss shares: next-token targets, the normaliser and the chunk size.

Two input layouts are accepted by the built-in losses, told apart by the number of dimensions:

* ``[batch, seq, ...]`` with ``[batch, seq]`` labels aligned with the inputs (Hugging Face
  convention): position ``t`` predicts ``labels[t + 1]``. The targets are built by shifting the
  *labels* left (``F.pad(labels[:, 1:], (0, 1), value=-100)``), never by slicing the logits:
  ``logits[:, :-1]`` is not contiguous, so flattening it copies the whole ``[batch, seq, vocab]``
  tensor (measured: 6-11% of the step time on the benchmark model, for nothing).
* ``[N, ...]`` rows with ``[N]`` targets that are already shifted. The recipe uses this layout to
  hand a loss only the trained positions (``components/loss/head.py``).

In both, ``-100`` marks positions that are not trained.

No torch at import time: the memory plan reads ``rows_per_chunk`` on machines that only submit jobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
#: Values in one ``[rows, vocab]`` chunk when ``loss.chunk_size`` is null: 2**25 floats are
#: 128 MiB in fp32, small next to a model yet large enough that one matmul per chunk stays
#: efficient (4096 rows for an 8k vocabulary, 261 rows for Llama 3's 128k).
CHUNK_ELEMENTS = 2**25


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` labels -> targets of the same shape: ``targets[:, t] = labels[:, t + 1]``,
    ``-100`` at the last position."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def as_rows(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [N, D], targets [N])`` from either layout (see the module docstring); a view,
    never a copy of ``inputs`` when it is contiguous."""
    labels = labels.to(inputs.device)
    if inputs.dim() == 3:
        if labels.shape != inputs.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match inputs {tuple(inputs.shape)}")
        return inputs.reshape(-1, inputs.size(-1)), shift_labels(labels).reshape(-1)
    if inputs.dim() == 2:
        if labels.shape != inputs.shape[:1]:
            raise ValueError(f"targets {tuple(labels.shape)} do not match rows {tuple(inputs.shape)}")
        return inputs, labels
    raise ValueError(f"expected [batch, seq, D] or [rows, D] inputs, got shape {tuple(inputs.shape)}")


def normaliser(num_label_tokens: int | torch.Tensor | None, targets: torch.Tensor) -> float:
    """The divisor of the summed token losses: ``num_label_tokens`` (the optimizer step's trained
    tokens, so micro-batches add up exactly) or this batch's trained tokens; at least 1."""
    if num_label_tokens is None:
        num_label_tokens = (targets != IGNORE_INDEX).sum()
    return max(float(num_label_tokens), 1.0)


def rows_per_chunk(chunk_size: int | None, vocab_size: int) -> int:
    """``chunk_size`` rows when given, else as many rows as fit ``CHUNK_ELEMENTS`` values."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))
