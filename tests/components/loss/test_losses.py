"""masked_ce, chunked_ce and linear_ce compute the same loss and gradients (fp32, to rounding), and
linear_ce never builds a [tokens, vocab] tensor, in forward or backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from automodel_cli.components.loss.chunked_ce import chunked_cross_entropy
from automodel_cli.components.loss.linear_ce import linear_cross_entropy
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.loss.targets import rows_per_chunk, shift_labels
from tolerances import assert_close_f32

B, T, H, V = 3, 9, 16, 37  # 27 positions: chunk sizes 4, 5, 7, 10 do not divide them
#: Values summed into a loss or gradient element: the head's matmul over H and its bias, the
#: log-softmax over V, then the 27 positions (tests/tolerances.py).
TERMS = H + 1 + V + B * T
#: Rounding steps of cross-entropy: subtract the max, exp, log, subtract, divide by the count.
DEPTH = 5


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator)
    weight = torch.randn(V, H, generator=generator) * 0.5
    bias = torch.randn(V, generator=generator) * 0.1
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    labels[2, :] = -100  # a row with nothing to train
    return hidden, weight, bias, labels


def loss_and_grads(kind: str, hidden, weight, bias, labels, n, chunk_size=None, use_bias=True):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if use_bias else None
    if kind == "masked":
        loss = masked_cross_entropy(F.linear(hidden, weight, bias), labels, n)
    elif kind == "chunked":
        loss = chunked_cross_entropy(F.linear(hidden, weight, bias), labels, n, chunk_size=chunk_size)
    else:
        loss = linear_cross_entropy(hidden, weight, labels, n, bias=bias, chunk_size=chunk_size)
    loss.backward()
    grads = [hidden.grad, weight.grad] + ([bias.grad] if use_bias else [])
    return loss.detach(), grads


def assert_same(got, want, bf16_tol=None):
    """Loss and gradients equal to float32 rounding, or within ``bf16_tol`` (relative and absolute)
    for values computed under bf16 autocast."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert len(grads) == len(ref_grads)
    for g, r in zip([loss, *grads], [ref_loss, *ref_grads]):
        assert g is not None and r is not None
        if bf16_tol is None:
            assert_close_f32(g, r, terms=TERMS, depth=DEPTH)
        else:
            torch.testing.assert_close(g, r, rtol=bf16_tol, atol=bf16_tol)


@pytest.mark.parametrize("kind", ["chunked", "linear"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 10, 27, 1000, None])
@pytest.mark.parametrize("n", [None, 40])
def test_equal_to_masked_ce_with_gradients(kind, chunk_size, n):
    hidden, weight, bias, labels = make_inputs()
    want = loss_and_grads("masked", hidden, weight, bias, labels, n)
    assert want[0] > 0 and want[1][0][2].abs().sum() == 0  # the all-masked row gets no gradient
    assert_same(loss_and_grads(kind, hidden, weight, bias, labels, n, chunk_size), want)


def test_without_bias_and_with_another_seed():
    hidden, weight, bias, labels = make_inputs(seed=3)
    want = loss_and_grads("masked", hidden, weight, bias, labels, 17, use_bias=False)
    assert_same(loss_and_grads("linear", hidden, weight, bias, labels, 17, 6, use_bias=False), want)
    assert_same(loss_and_grads("chunked", hidden, weight, bias, labels, 17, 6, use_bias=False), want)


def test_masked_ce_is_the_textbook_shifted_cross_entropy():
    hidden, weight, bias, labels = make_inputs()
    logits = F.linear(hidden, weight, bias)
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close_f32(masked_cross_entropy(logits, labels), by_hand, terms=TERMS, depth=DEPTH)
    # the normaliser divides the sum of token losses
    count = int((labels[:, 1:] != -100).sum())
    assert_close_f32(masked_cross_entropy(logits, labels, 2 * count), by_hand / 2, terms=TERMS, depth=DEPTH)


def test_rows_layout_equals_batch_layout():
    """[N, D] rows with shifted targets (what head.py passes) give the batch layout's result."""
    hidden, weight, bias, labels = make_inputs()
    targets = shift_labels(labels).reshape(-1)
    keep = targets != -100
    rows = hidden.reshape(-1, H)[keep]
    want = masked_cross_entropy(F.linear(hidden, weight, bias), labels, 30)
    for got in (masked_cross_entropy(F.linear(rows, weight, bias), targets[keep], 30),
                chunked_cross_entropy(F.linear(rows, weight, bias), targets[keep], 30, 4),
                linear_cross_entropy(rows, weight, targets[keep], 30, bias=bias, chunk_size=4)):
        assert_close_f32(got, want, terms=TERMS, depth=DEPTH)


@pytest.mark.parametrize("kind", ["masked", "chunked", "linear"])
def test_nothing_to_train_gives_zero_loss_and_zero_gradients(kind):
    hidden, weight, bias, labels = make_inputs()
    labels[:] = -100
    loss, grads = loss_and_grads(kind, hidden, weight, bias, labels, None, 4)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_right():
    """LoRA: the head is frozen; only the hidden states need a gradient."""
    hidden, weight, bias, labels = make_inputs()
    ref_hidden = hidden.clone().requires_grad_()
    masked_cross_entropy(F.linear(ref_hidden, weight), labels).backward()
    fused_hidden = hidden.clone().requires_grad_()
    frozen = weight.clone()
    linear_cross_entropy(fused_hidden, frozen, labels, chunk_size=5).backward()
    assert frozen.grad is None
    assert_close_f32(fused_hidden.grad, ref_hidden.grad, terms=TERMS, depth=DEPTH)


def test_under_no_grad_only_the_value_is_computed():
    hidden, weight, bias, labels = make_inputs()
    want = masked_cross_entropy(F.linear(hidden, weight, bias), labels)
    with torch.no_grad():
        got = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels, bias=bias, chunk_size=4)
    assert not got.requires_grad
    assert_close_f32(got, want, terms=TERMS, depth=DEPTH)


def test_bf16_autocast_matches_masked_ce_on_autocast_logits():
    hidden, weight, bias, labels = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads("masked", hidden, weight, bias, labels, None)
        got = loss_and_grads("linear", hidden, weight, bias, labels, None, 5)
    assert got[1][0].dtype == torch.float32  # gradients come back in the inputs' dtypes
    assert_same(got, want, bf16_tol=2e-2)  # a few bf16 roundings (2**-8 each) of the logits


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_ce_never_materialises_the_logits():
    n_tokens, hidden_size, vocab, chunk = 64, 8, 1000, 5
    hidden = torch.randn(n_tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (n_tokens,))

    with _LargestTensor() as reference:  # the detector sees full logits where they exist
        masked_cross_entropy(F.linear(hidden, weight), targets).backward()
    assert reference.largest >= n_tokens * vocab

    with _LargestTensor() as fused:
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    # one chunk of logits, or the size of the head's weight (its gradient), nothing larger
    assert fused.largest <= max(chunk * vocab, vocab * hidden_size) < n_tokens * vocab


def test_default_chunk_size_follows_the_vocabulary():
    assert rows_per_chunk(None, 128256) == 2**25 // 128256
    assert rows_per_chunk(None, 8192) == 4096
    assert rows_per_chunk(7, 128256) == 7
    with pytest.raises(ValueError):
        rows_per_chunk(0, 10)
