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

``linear_distillation_loss`` goes further for ``loss.name=linear_ce``: it takes the student's
hidden states and LM head instead of its logits and computes CE and KL chunk by chunk with the
fused-head machinery ``linear_ce`` uses (``fused_linear.py``), so the student's logits never
exist in full (at Llama 3's vocabulary the peak a distillation step adds fell from 5.0 GB to
1.9 GB; docs/benchmarks.md). It is ``linear_ce``'s ``distillation`` function (``builtin.py``).
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


def linear_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    num_label_tokens: int | torch.Tensor | None = None,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    direction: str = "forward",
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` of ``distillation_loss(masked_ce, kd_loss)`` computed from the
    student's final hidden states and LM head, chunk by chunk: the student's logits never exist
    in full, in forward or backward (``fused_linear.fused_linear_loss``).

    ``hidden`` ``[N, H]`` are the student's hidden states at the rows to train, ``targets``
    ``[N]`` their (shifted) next tokens, -100 where a row is not trained, ``teacher_logits``
    ``[N, V_teacher]`` the teacher's logits at the same rows (no gradient). ``loss`` carries the
    gradient with respect to ``hidden``, ``weight`` and ``bias``; ``ce`` and ``kl`` are the
    detached terms (each divided by ``num_label_tokens``) for logging.
    """
    from automodel_cli.components.loss.fused_linear import cross_entropy_chunk, fused_linear_loss
    from automodel_cli.components.loss.targets import normaliser, rows_per_chunk

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or teacher_logits.shape[:1] != hidden.shape[:1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, teacher logits {tuple(teacher_logits.shape)} and "
                         f"targets {tuple(targets.shape)} must cover the same rows")
    vocab = vocab_size or min(weight.size(0), teacher_logits.size(-1))
    if vocab_size is None and weight.size(0) != teacher_logits.size(-1):
        raise ValueError(f"student and teacher have {weight.size(0)} and {teacher_logits.size(-1)} logits; "
                         "pass vocab_size to compare a common prefix")
    scale = 1.0 / normaliser(num_label_tokens, targets)
    ce_scale, kd_scale = 1.0 - kd_weight, kd_weight * temperature**2
    reverse = direction == "reverse"

    def chunk_loss(z: torch.Tensor, start: int, end: int, want_grad: bool):
        rows_targets = targets[start:end]
        valid = (rows_targets != IGNORE_INDEX).unsqueeze(1)
        per_row, kl_grad = kl_rows(z[:, :vocab], teacher_logits[start:end, :vocab], temperature, reverse, want_grad)
        kl = (per_row * valid.squeeze(1)).sum() * scale
        ce, grad = cross_entropy_chunk(z, rows_targets, scale, want_grad)  # overwrites z with its gradient
        if grad is not None:
            grad.mul_(ce_scale)
            grad[:, :vocab] += kl_grad.mul_(valid * (kd_scale * scale))
        return torch.stack([ce_scale * ce + kd_scale * kl, ce, kl]), grad

    # About four vocabulary-sized fp32 temporaries live per chunk (the logits, both distributions,
    # the KL gradient) against linear_ce's one: a quarter of its rows keeps the same peak.
    chunk = rows_per_chunk(chunk_size or max(1, CHUNK_ELEMENTS // (4 * weight.size(0))), weight.size(0))
    terms = fused_linear_loss(hidden, weight, bias, chunk_loss, 3, chunk)
    return terms[0], terms[1].detach(), terms[2].detach()


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool,
            want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row KL at ``temperature`` between the distributions of ``teacher`` (p) and ``student``
    (q) logits ``[rows, vocab]`` (fp32 math), and its gradient with respect to the student
    logits when ``want_grad``:

    forward KL ``sum p (log p - log q)``:  d/ds = (q - p) / T
    reverse KL ``sum q (log q - log p)``:  d/ds = q * ((log q - log p) - KL) / T
    """
    # In-place work on a few [rows, vocab] buffers: on CPU every fresh temporary of this size costs
    # page faults, which dominated the time of an out-of-place version (-30% step time here).
    # Log-probabilities are clamped to a finite minimum so that a -inf logit (a masked token)
    # contributes 0 * finite = 0 instead of 0 * -inf = nan.
    log_q = _log_probabilities(student, temperature)
    log_p = _log_probabilities(teacher, temperature)
    grad = None
    if reverse:
        q = log_q.exp()
        diff = log_q.sub_(log_p)  # log q - log p, in log_q's buffer
        per_row = (q * diff).sum(-1)
        if want_grad:
            grad = diff.sub_(per_row.unsqueeze(-1)).mul_(q).div_(temperature)
    else:
        p = log_p.exp()
        diff = log_p.sub_(log_q)  # log p - log q, in log_p's buffer
        per_row = diff.mul_(p).sum(-1)
        if want_grad:
            grad = log_q.exp_().sub_(p).div_(temperature)
    return per_row, grad


def _log_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``log_softmax(logits / temperature)`` clamped to a finite minimum, in one new buffer
    (two for non-fp32 logits: the upcast is divided in place)."""
    scaled = logits.float().div_(temperature) if logits.dtype != torch.float32 else logits / temperature
    return F.log_softmax(scaled, dim=-1).clamp_(min=torch.finfo(torch.float32).min)


class _ChunkedKL(torch.autograd.Function):
    """Sum of per-row KL over ``rows`` of ``student`` / ``teacher`` ([N, V] each); the gradient
    with respect to the student logits is computed in the forward pass, chunk by chunk
    (``kl_rows``)."""

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, reverse, vocab_size, chunk_rows, want_grad):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = (torch.empty((rows.numel(), vocab_size), dtype=student.dtype, device=student.device)
                if want_grad else None)
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start:start + chunk_rows]
            per_row, chunk_grad = kl_rows(student.index_select(0, index)[:, :vocab_size].float(),
                                          teacher.index_select(0, index)[:, :vocab_size], temperature, reverse,
                                          want_grad)
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
