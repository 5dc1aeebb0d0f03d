"""``kd.linear_distillation_loss``: CE and KL from hidden states and the LM head, chunk by chunk,
against the full-logits path (``masked_ce`` + ``kd_loss``, itself checked against F.kl_div in
test_kd.py): the three values and the gradients of hidden states, weight and bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel_cli.components.loss.kd import distillation_loss, kd_loss, linear_distillation_loss
from automodel_cli.components.loss.linear_ce import linear_cross_entropy
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.loss.targets import shift_labels
from tolerances import assert_close_f32

B, T, H, V = 3, 9, 8, 13
#: Rounding steps after the matmul: the KL element's (test_kd.py), the bias, the CE/KL mix.
DEPTH = 12


def terms(labels):
    """Values summed into one result: the head's matmul over H (and the bias), a log-softmax and a
    KL sum over V, then the sum over trained positions (the weight's gradient sums over them too)."""
    return H + 1 + 2 * V + int((labels[:, 1:] != -100).sum())


def case(teacher_vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.1
    teacher_logits = torch.randn(B, T, teacher_vocab, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    return hidden, weight, bias, teacher_logits, labels


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def full_logits_path(hidden, weight, bias, teacher_logits, labels, n, kd_weight, temperature, direction, vocab):
    logits = F.linear(hidden, weight, bias)
    ce = masked_cross_entropy(logits, labels, n)
    kl = kd_loss(logits, teacher_logits, labels, n, temperature=temperature, direction=direction, vocab_size=vocab)
    return distillation_loss(ce, kl, kd_weight=kd_weight, temperature=temperature), ce, kl


def fused_path(hidden, weight, bias, teacher_logits, labels, n, kd_weight, temperature, direction, vocab,
               chunk_size=None):
    # Every row, untrained ones included (-100 targets), as [N, H] rows with shifted targets.
    return linear_distillation_loss(hidden.reshape(-1, H), weight, teacher_logits.reshape(B * T, -1),
                                    shift_labels(labels).reshape(-1), n, kd_weight=kd_weight,
                                    temperature=temperature, direction=direction, vocab_size=vocab, bias=bias,
                                    chunk_size=chunk_size)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature, kd_weight", [(1.0, 0.5), (2.5, 1.0), (0.7, 0.0), (2.0, 0.3)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_the_full_logits_path(direction, temperature, kd_weight, chunk_size):
    hidden, weight, bias, teacher_logits, labels = case()
    n = 40  # the step's label tokens (more than this micro-batch's)
    want_in, got_in = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    want = full_logits_path(*want_in, teacher_logits, labels, n, kd_weight, temperature, direction, None)
    got = fused_path(*got_in, teacher_logits, labels, n, kd_weight, temperature, direction, None, chunk_size)
    for g, w in zip(got, want):
        assert_close_f32(g, w.detach(), terms=terms(labels), depth=DEPTH)
    assert not got[1].requires_grad and not got[2].requires_grad  # reported terms only
    assert got[2] > 0.01 and got[1] > 0.01
    want[0].backward()
    got[0].backward()
    for g, w, name in zip(got_in, want_in, ("hidden", "weight", "bias")):
        assert_close_f32(g.grad, w.grad, terms=terms(labels), depth=DEPTH, msg=name)


def test_teacher_with_a_padded_vocabulary_compares_the_common_prefix():
    hidden, weight, bias, teacher_logits, labels = case(teacher_vocab=V + 3)
    want_in, got_in = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    want = full_logits_path(*want_in, teacher_logits, labels, None, 0.5, 2.0, "forward", V)
    got = fused_path(*got_in, teacher_logits, labels, None, 0.5, 2.0, "forward", V)
    assert_close_f32(got[0], want[0].detach(), terms=terms(labels), depth=DEPTH)
    want[0].backward()
    got[0].backward()
    assert_close_f32(got_in[1].grad, want_in[1].grad, terms=terms(labels), depth=DEPTH)
    with pytest.raises(ValueError, match="pass vocab_size"):
        fused_path(*got_in, teacher_logits, labels, None, 0.5, 2.0, "forward", None)


def test_identical_teacher_gives_zero_kl_and_the_ce_of_linear_ce():
    hidden, weight, bias, _, labels = case()
    teacher_logits = F.linear(hidden, weight, bias)
    loss, ce, kl = fused_path(hidden, weight, bias, teacher_logits, labels, None, 0.5, 1.0, "reverse", None)
    # The student's logits come from another (chunked) matmul than the teacher's, so the KL is zero
    # up to the rounding of log-probabilities of this size, not exactly.
    log_probability_scale = float(F.log_softmax(teacher_logits, -1).abs().max())
    assert_close_f32(kl, torch.zeros(()), terms=terms(labels), depth=DEPTH, scale=log_probability_scale)
    assert_close_f32(ce, linear_cross_entropy(hidden, weight, labels, bias=bias), terms=terms(labels), depth=DEPTH)
    assert_close_f32(loss, 0.5 * ce, terms=terms(labels), depth=DEPTH, scale=log_probability_scale)


def test_under_no_grad_no_graph_and_the_same_values():
    hidden, weight, bias, teacher_logits, labels = case()
    with_grad = fused_path(*leaves(hidden, weight, bias), teacher_logits, labels, None, 0.5, 2.0, "forward", None)
    with torch.no_grad():
        without = fused_path(*leaves(hidden, weight, bias), teacher_logits, labels, None, 0.5, 2.0, "forward", None)
    assert not without[0].requires_grad
    for a, b in zip(with_grad, without):
        assert_close_f32(a.detach(), b, terms=terms(labels), depth=DEPTH)


def test_bad_arguments_are_refused():
    hidden, weight, bias, teacher_logits, labels = case()
    with pytest.raises(ValueError, match="direction"):
        fused_path(hidden, weight, bias, teacher_logits, labels, None, 0.5, 1.0, "sideways", None)
    with pytest.raises(ValueError, match="temperature"):
        fused_path(hidden, weight, bias, teacher_logits, labels, None, 0.5, 0.0, "forward", None)
    with pytest.raises(ValueError, match="same rows"):
        linear_distillation_loss(hidden.reshape(-1, H), weight, teacher_logits.reshape(-1, V)[:-1],
                                 shift_labels(labels).reshape(-1), kd_weight=0.5)
