"""Float32 tolerances derived from rounding, not from what one machine printed.

Two correct float32 computations of the same quantity (a fused kernel and its reference, one
process and four, one chunk size and another) differ by rounding alone, and by how much depends
on the CPU: BLAS and vectorised kernels sum in an order that changes with AVX2 or AVX-512, the
thread count and the chunking. A tolerance read off one machine's output (``atol=1e-7`` on a
gradient) is that machine's summation order; on another x86-64 CPU it fails.

So a tolerance here is computed from the operation:

* every float32 operation rounds with relative error at most ``EPS32 / 2`` (``EPS32 = 2**-23``,
  about 1.19e-7);
* a sum of ``n`` terms accumulates at most ``(n - 1) * EPS32 / 2`` relative to the sum of the
  terms' magnitudes, whatever the order (recursive, pairwise or blocked; Higham, *Accuracy and
  Stability of Numerical Algorithms*, section 4.2). Two computations in two orders differ by at
  most twice that: ``n * EPS32``;
* the error is relative to the magnitude of the values the element was computed from, which an
  element near zero does not show (the gradient of a token both models agree on is a
  difference of probabilities of the tensor's usual size). So the absolute part scales with the
  largest ``|expected|`` of the whole tensor, or with ``scale`` where the intermediate values
  are larger than any result (a KL divergence of two equal distributions is zero, computed from
  log-probabilities of order one).

``tolerance = EPS32 * (terms + depth) * magnitude``, where ``terms`` counts every value summed
into one element over all chained reductions (a matmul over H, a log-softmax over V, a mean over
N tokens: ``H + V + N``) and ``depth`` the elementwise operations each rounding once on the way
(scale, exp, log, subtract, multiply). This is the worst case, so it holds on any CPU whatever its
summation order; for the tests' small shapes it comes to between 1e-6 and a few 1e-4 of the
magnitude, while a wrong temperature, sign, normaliser or mask is off by far more and still fails.

Comparisons that are bit-exact by construction (the same code on the same inputs: a save/load
round trip, a checkpoint resume) stay ``rtol=0, atol=0`` and do not use this module. Neither do
training curves (losses after several optimizer steps): each step feeds the last one's rounding
differences forward, so those compare relatively (1e-5 to 1e-4), with the reason beside each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are compared, so torch-free tests can use f32_tol
    import torch

EPS32 = 2.0**-23  # torch.finfo(torch.float32).eps


def f32_tol(expected: torch.Tensor | float, *, terms: int = 1, depth: int = 1,
            scale: float | None = None) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a float32 result with ``expected`` (see module docstring).

    ``rtol`` covers each element's own rounding, ``atol`` the rounding of values of the tensor's
    magnitude (``scale`` if given, else ``max |expected|``) that near-zero elements came from.
    Also usable for Python floats, as ``pytest.approx(expected, rel=rtol, abs=atol)``.
    """
    if scale is None:
        scale = abs(expected) if isinstance(expected, (int, float)) else float(expected.detach().abs().max())
    unit = EPS32 * (terms + depth)
    return unit, unit * scale


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, *, terms: int = 1, depth: int = 1,
                     scale: float | None = None, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the float32 rounding tolerance of ``f32_tol``."""
    import torch

    rtol, atol = f32_tol(expected, terms=terms, depth=depth, scale=scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def decoder_rounding(*, layers: int, hidden: int, intermediate: int, positions: int, vocab: int = 0,
                     tokens: int = 0, gradients: bool = False, merged_rank: int = 0) -> dict[str, int]:
    """``terms`` and ``depth`` for outputs of a small decoder-only transformer (a tiny Llama).

    One logit sums, per layer, along the hidden size (projections, norm), the MLP size and
    attention over ``positions``, then along the hidden size in the LM head; each layer rounds
    about ten times on the way (norm, rotary, softmax, SiLU, residual adds). A loss adds the
    log-softmax over ``vocab`` and the sum over ``tokens`` (and five rounding steps); with
    ``gradients``, a parameter's gradient sums over the tokens once more in each layer. A LoRA or
    DoRA adapter of rank ``merged_rank`` merged into the weights adds ``B @ A`` (a sum over the rank)
    to each of them, and DoRA divides by a norm over at most ``intermediate`` input features.
    """
    per_layer = hidden + intermediate + positions + (tokens if gradients else 0)
    terms = layers * per_layer + hidden + vocab + tokens
    depth = 10 * layers + (5 if vocab else 1)
    if merged_rank:
        terms, depth = terms + 2 * merged_rank + intermediate, depth + 3
    return {"terms": terms, "depth": depth}


def first_loss_tolerance(loss: float, *, layers: int, hidden: int, intermediate: int, vocab: int,
                         positions: int, tokens: int) -> dict[str, float]:
    """``pytest.approx`` keywords for two correct float32 computations of a small decoder's
    first-step loss (before any update: the same weights, rounded in another order)."""
    rtol, atol = f32_tol(loss, **decoder_rounding(layers=layers, hidden=hidden, intermediate=intermediate,
                                                  positions=positions, vocab=vocab, tokens=tokens))
    return {"rel": rtol, "abs": atol}
