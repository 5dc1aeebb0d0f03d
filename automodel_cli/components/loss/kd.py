"""Knowledge-distillation loss: KL divergence between the teacher's and the student's
temperature-scaled next-token distributions, over the trained (non -100) positions.

``kd_loss`` returns ``sum over trained positions of KL_T / num_label_tokens`` where, with
``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``,

* ``direction="forward"``: ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (classic KD: the student
  covers every token the teacher finds likely);
* ``direction="reverse"``: ``KL(q || p)`` (mode-seeking: the student concentrates on the teacher's
  most likely tokens).

Positions are shifted exactly like ``masked_ce``: position ``t`` of both logits predicts
``labels[t + 1]``, and only positions whose next label is not -100 count (prompt, padding and
chat-template tokens carry no distillation signal). The sum is divided by ``num_label_tokens``,
the label-token count of the *whole optimizer step* (see ``masked_ce.py``): every trained token
weighs the same however tokens fall into micro-batches or data-parallel ranks, so the KD term
adds up across micro-batches and ranks exactly like the CE term.

``distillation_loss`` mixes the two: ``(1 - w) * CE + w * T**2 * KL_T``. The ``T**2`` keeps the
gradient of the KD term at the same scale whatever the temperature (the gradient of ``KL_T`` with
respect to the logits shrinks as ``1 / T**2`` for large ``T``; Hinton et al., 2015).

Memory: the loss and its gradient are computed together, chunk by chunk over the trained
positions (a custom autograd function), so the extra memory is one ``[trained tokens, vocab]``
gradient in the logits' dtype plus the fp32 work of one chunk, instead of several fp32 copies of
the whole ``[batch, sequence, vocab]`` logits for the teacher and the student. The teacher never
receives a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIRECTIONS = ("forward", "reverse")
#: Elements of one fp32 chunk ([tokens, vocab]); 2**25 floats = 128 MiB per temporary.
CHUNK_ELEMENTS = 2**25


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    vocab_size: int | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Token-level KL divergence at ``temperature`` over trained positions (see module docstring).

    ``student_logits`` and ``teacher_logits`` are ``[batch, seq, vocab]``, ``labels`` is
    ``[batch, seq]`` aligned with the inputs. ``vocab_size`` compares only the first
    ``vocab_size`` logits, for models that share a tokenizer but pad their embedding matrices
    to different sizes; by default both logits must have the same width.
    ``num_label_tokens`` is the normaliser (default: the trained positions of this batch).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} cover different positions")
    if vocab_size is None:
        if student_logits.size(-1) != teacher_logits.size(-1):
            raise ValueError(f"student and teacher have {student_logits.size(-1)} and "
                             f"{teacher_logits.size(-1)} logits; pass vocab_size to compare a common prefix")
        vocab_size = student_logits.size(-1)
    elif vocab_size > min(student_logits.size(-1), teacher_logits.size(-1)):
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits' widths "
                         f"{student_logits.size(-1)} and {teacher_logits.size(-1)}")

    batch, seq = labels.shape
    # Row b * seq + t of the flattened logits predicts labels[b, t + 1].
    trained = labels[:, 1:].to(student_logits.device) != IGNORE_INDEX
    b, t = trained.nonzero(as_tuple=True)
    rows = b * seq + t
    chunk_rows = max(1, chunk_elements // vocab_size)
    # Inside the autograd function grad mode is always off and ``needs_input_grad`` ignores it:
    # decide here whether a gradient will be wanted (not under no_grad, e.g. in evaluation).
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total = _ChunkedKL.apply(student_logits.reshape(batch * seq, -1), teacher_logits.reshape(batch * seq, -1),
                             rows, float(temperature), direction == "reverse", vocab_size, chunk_rows, want_grad)
    if num_label_tokens is None:
        num_label_tokens = rows.numel()
    return total / torch.as_tensor(num_label_tokens, dtype=total.dtype, device=total.device).clamp(min=1)


def distillation_loss(ce: torch.Tensor, kl: torch.Tensor, *, kd_weight: float, temperature: float) -> torch.Tensor:
    """``(1 - kd_weight) * ce + kd_weight * temperature**2 * kl``."""
    return (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl


class _ChunkedKL(torch.autograd.Function):
    """Sum of per-row KL over ``rows`` of ``student`` / ``teacher`` ([N, V] each); the gradient
    with respect to the student logits is computed in the forward pass, chunk by chunk:

    forward KL ``sum p (log p - log q)``:  d/ds = (q - p) / T
    reverse KL ``sum q (log q - log p)``:  d/ds = q * ((log q - log p) - KL) / T
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, reverse, vocab_size, chunk_rows, want_grad):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = (torch.empty((rows.numel(), vocab_size), dtype=student.dtype, device=student.device)
                if want_grad else None)
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start:start + chunk_rows]
            log_q = F.log_softmax(student.index_select(0, index)[:, :vocab_size].float() / temperature, dim=-1)
            log_p = F.log_softmax(teacher.index_select(0, index)[:, :vocab_size].float() / temperature, dim=-1)
            if reverse:
                q = log_q.exp()
                diff = log_q - log_p
                per_row = torch.where(q > 0, q * diff, 0.0).sum(-1)
                if want_grad:
                    chunk_grad = torch.where(q > 0, q * (diff - per_row.unsqueeze(-1)), 0.0) / temperature
            else:
                p = log_p.exp()
                per_row = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
                if want_grad:
                    chunk_grad = (log_q.exp() - p) / temperature
            total += per_row.sum()
            if want_grad:
                grad[start:start + index.numel()] = chunk_grad
        ctx.want_grad = want_grad
        ctx.save_for_backward(rows, grad if want_grad else torch.empty(0))
        ctx.student_shape = student.shape
        ctx.vocab_size, ctx.chunk_rows = vocab_size, chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        rows, grad = ctx.saved_tensors
        full = None
        if ctx.needs_input_grad[0] and ctx.want_grad:
            full = torch.zeros(ctx.student_shape, dtype=grad.dtype, device=grad.device)
            for start in range(0, rows.numel(), ctx.chunk_rows):
                end = start + ctx.chunk_rows
                full[rows[start:end], :ctx.vocab_size] = (grad[start:end].float() * grad_total).to(grad.dtype)
        return full, None, None, None, None, None, None, None
