"""The chunked KD loss against a direct computation with torch.nn.functional.kl_div, values and
gradients: both directions, temperatures, masking, the step normaliser, chunking, a common
vocabulary prefix, bf16 logits, and no gradient for the teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel_cli.components.loss.kd import distillation_loss, kd_loss
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from tolerances import assert_close_f32

#: Rounding steps of one KL element: divide by T, log-softmax (max, subtract, exp, log), the
#: difference of log-probabilities, times a probability, and for the gradient one more of each.
KD_DEPTH = 8


def reference_kd(student, teacher, labels, normaliser, temperature, direction, vocab=None):
    """Shift, select the trained positions, KL with F.kl_div, sum, divide."""
    vocab = vocab or student.size(-1)
    s = student[:, :-1, :vocab].float() / temperature
    t = teacher[:, :-1, :vocab].float() / temperature
    mask = labels[:, 1:] != -100
    log_q, log_p = F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1)
    if direction == "forward":  # KL(teacher || student)
        per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:  # KL(student || teacher)
        per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    return per_token.sum() / normaliser


def kd_terms(labels, vocab=11):
    """Values summed into the KD loss: a log-softmax and a KL sum over the vocabulary per
    position, then the sum over the trained positions (tests/tolerances.py)."""
    return 2 * vocab + int((labels[:, 1:] != -100).sum())


def make_batch(seed=0, batch=3, seq=7, vocab=11, teacher_vocab=None):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq, vocab, generator=generator) * 3).requires_grad_()
    teacher = torch.randn(batch, seq, teacher_vocab or vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100   # a row with nothing to train
    return student, teacher, labels


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_elements", [2**25, 11 * 2])  # one chunk, or two rows per chunk
def test_matches_kl_div_values_and_gradients(direction, temperature, chunk_elements):
    student, teacher, labels = make_batch()
    got = kd_loss(student, teacher, labels, 13, temperature=temperature, direction=direction,
                  chunk_elements=chunk_elements)
    (got_grad,) = torch.autograd.grad(got * 1.7, student)
    expected = reference_kd(student, teacher, labels, 13, temperature, direction)
    (expected_grad,) = torch.autograd.grad(expected * 1.7, student)
    assert_close_f32(got, expected, terms=kd_terms(labels), depth=KD_DEPTH)
    assert_close_f32(got_grad, expected_grad, terms=kd_terms(labels), depth=KD_DEPTH)
    # untrained positions (prompt, padding, last position) get no gradient
    assert got_grad[2].abs().sum() == 0 and got_grad[1, 4:].abs().sum() == 0
    assert got_grad[:, -1].abs().sum() == 0


def test_default_normaliser_is_the_batch_label_count_and_identical_models_give_zero():
    student, teacher, labels = make_batch(seed=1)
    count = int((labels[:, 1:] != -100).sum())
    assert_close_f32(kd_loss(student, teacher, labels),
                     reference_kd(student, teacher, labels, count, 1.0, "forward"),
                     terms=kd_terms(labels), depth=KD_DEPTH)
    # One code path computes both log-probabilities from the same values: exactly zero.
    same = kd_loss(student, student.detach(), labels)
    assert same.item() == 0.0
    (grad,) = torch.autograd.grad(same, student)
    assert grad.abs().max() == 0.0


def test_sums_over_micro_batches_like_masked_ce():
    """Split a batch in two and normalise by the whole count: the sum is the full-batch value."""
    student, teacher, labels = make_batch(seed=2, batch=4)
    count = int((labels[:, 1:] != -100).sum())
    whole = kd_loss(student, teacher, labels, count)
    parts = kd_loss(student[:2], teacher[:2], labels[:2], count) + kd_loss(student[2:], teacher[2:], labels[2:], count)
    assert_close_f32(parts, whole, terms=kd_terms(labels), depth=KD_DEPTH)


def test_common_vocabulary_prefix():
    student, teacher, labels = make_batch(seed=3, vocab=11, teacher_vocab=14)
    got = kd_loss(student, teacher, labels, vocab_size=11)
    expected = reference_kd(student, teacher, labels, int((labels[:, 1:] != -100).sum()), 1.0, "forward", vocab=11)
    assert_close_f32(got, expected, terms=kd_terms(labels), depth=KD_DEPTH)
    assert_close_f32(torch.autograd.grad(got, student)[0], torch.autograd.grad(expected, student)[0],
                     terms=kd_terms(labels), depth=KD_DEPTH)
    with pytest.raises(ValueError, match="11 and 14 logits"):
        kd_loss(student, teacher, labels)


def test_teacher_gets_no_gradient_and_bad_arguments_are_refused():
    student, teacher, labels = make_batch(seed=4)
    teacher.requires_grad_()
    kd_loss(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="direction"):
        kd_loss(student, teacher, labels, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, labels, temperature=0)


def test_bf16_logits():
    student, teacher, labels = make_batch(seed=5)
    student_bf16 = student.detach().bfloat16().requires_grad_()
    got = kd_loss(student_bf16, teacher.bfloat16(), labels, temperature=2.0)
    expected = reference_kd(student_bf16, teacher.bfloat16(), labels,
                            int((labels[:, 1:] != -100).sum()), 2.0, "forward")
    assert_close_f32(got, expected, terms=kd_terms(labels), depth=KD_DEPTH)  # fp32 math on bf16 values
    got_grad = torch.autograd.grad(got, student_bf16)[0]
    assert got_grad.dtype == torch.bfloat16
    # bf16 gradients: torch's bf16 tolerance (rtol 2**-6), a few bf16 roundings of an fp32 value
    torch.testing.assert_close(got_grad, torch.autograd.grad(expected, student_bf16)[0])


def test_distillation_loss_mixes_ce_and_scaled_kl():
    student, teacher, labels = make_batch(seed=6)
    ce = masked_cross_entropy(student, labels)
    kl = kd_loss(student, teacher, labels, temperature=2.0)
    mixed = distillation_loss(ce, kl, kd_weight=0.25, temperature=2.0)
    assert_close_f32(mixed, 0.75 * ce + 0.25 * 4.0 * kl, terms=2, depth=3)
    assert distillation_loss(ce, kl, kd_weight=0.0, temperature=2.0) == ce


def test_under_no_grad_same_value_and_no_graph():
    """Evaluation (and a KD weight of 0) call it under no_grad."""
    student, teacher, labels = make_batch(seed=7)
    with torch.no_grad():
        value = kd_loss(student, teacher, labels)
    assert not value.requires_grad
    assert_close_f32(value, kd_loss(student, teacher, labels).detach(), terms=kd_terms(labels), depth=KD_DEPTH)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_tokens_with_minus_infinity_logits_give_finite_values(direction):
    """A token both models rule out (-inf logit) contributes nothing, never nan."""
    student, teacher, labels = make_batch()
    teacher = teacher.clone()
    teacher[..., 3] = float("-inf")
    with torch.no_grad():
        student[..., 3] = float("-inf")
    got = kd_loss(student, teacher, labels, 10, temperature=2.0, direction=direction)
    keep = [v for v in range(student.size(-1)) if v != 3]
    want = reference_kd(student[..., keep], teacher[..., keep], labels, 10, 2.0, direction)
    assert torch.isfinite(got)
    assert_close_f32(got, want, terms=kd_terms(labels), depth=KD_DEPTH)
    got.backward()
    assert torch.isfinite(student.grad).all()
