"""Preference losses (DPO and relatives) on per-sequence log-probabilities; no config, no model.

Notation, for a batch of pairs ``(x, y_w, y_l)`` (prompt, chosen, rejected): ``log π(y|x)`` is
the *sum* of the response tokens' log-probabilities under the policy (``log π_ref`` under the
frozen reference), ``|y|`` the number of response tokens, ``β`` the strength (``dpo.beta``),
``ε`` the label smoothing and ``σ`` the logistic function. The log-ratios are
``r_w = log π(y_w|x) - log π_ref(y_w|x)`` and ``r_l`` likewise, ``Δ = r_w - r_l``.

- ``sigmoid`` (DPO, Rafailov et al. 2023; with ``ε`` the conservative DPO of TRL < 1.0 and CPO):
  ``-(1 - ε) log σ(β Δ) - ε log σ(-β Δ)``
- ``hinge`` (SLiC): ``max(0, 1 - β Δ)``
- ``ipo`` (Azar et al. 2023, with TRL's per-token normalisation):
  ``(r_w / |y_w| - r_l / |y_l| - 1 / (2 β))²``
- ``simpo`` (Meng et al. 2024; reference-free, length-normalised, TRL's CPOTrainer
  ``loss_type="simpo"``): with ``a = log π(y|x) / |y|`` the average log-probability,
  ``-(1 - ε) log σ(β (a_w - a_l) - γ) - ε log σ(-β (a_w - a_l) + γ)``
- ``orpo`` (Hong et al. 2024; reference-free, TRL's ORPOTrainer): with
  ``log odds(y) = a - log(1 - exp(a))``, ``NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l))``
  where ``NLL`` is the chosen responses' token-mean cross-entropy and ``λ`` is
  ``dpo.orpo_alpha`` (TRL's ``ORPOConfig.beta``).

Rewards (logged, TRL's ``rewards/*``): ``β r`` for the losses with a reference, ``β a`` for
simpo and ``λ a`` for orpo; accuracy is the fraction of pairs with ``reward_w > reward_l``.

Every function returns *per-pair* values; the caller sums them and divides by the number of
pairs of the optimizer step over all ranks (so 1 and N processes agree), and for orpo adds the
NLL normalised by the step's chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Losses that compare the policy with a frozen reference model.
WITH_REFERENCE = ("sigmoid", "hinge", "ipo")
#: Losses that need no reference model.
REFERENCE_FREE = ("simpo", "orpo")
LOSSES = WITH_REFERENCE + REFERENCE_FREE


@dataclass
class PairLosses:
    """Per-pair losses and rewards (1-d tensors of the batch's pairs)."""

    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any


def log1mexp(x: Any) -> Any:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (as TRL's ORPO)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_losses(loss: str, *, chosen_logps: Any, rejected_logps: Any, chosen_tokens: Any,
                      rejected_tokens: Any, ref_chosen_logps: Any = None, ref_rejected_logps: Any = None,
                      beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                      orpo_alpha: float = 0.1) -> PairLosses:
    """Per-pair ``loss`` (one of ``LOSSES``, formulas in the module docstring) from summed
    response log-probabilities (``*_logps``) and response token counts (``*_tokens``); the
    ``ref_*`` sums are needed by ``WITH_REFERENCE`` losses only. Orpo's NLL term is not included
    (it is a token mean: ``orpo_nll``)."""
    import torch.nn.functional as F

    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; expected one of {LOSSES}")
    chosen_tokens = chosen_tokens.clamp(min=1).to(chosen_logps.dtype)
    rejected_tokens = rejected_tokens.clamp(min=1).to(rejected_logps.dtype)
    if loss in REFERENCE_FREE:
        chosen_avg, rejected_avg = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
        if loss == "simpo":
            logits = beta * (chosen_avg - rejected_avg) - simpo_gamma
            losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
            return PairLosses(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())
        chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        return PairLosses(-orpo_alpha * F.logsigmoid(log_odds), orpo_alpha * chosen_avg.detach(),
                          orpo_alpha * rejected_avg.detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"the {loss} loss needs the reference model's log-probabilities")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss == "hinge":
        losses = (1 - beta * delta).relu()
    else:  # ipo
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def token_logps(logits: Any, targets: Any) -> Any:
    """Log-probabilities of ``targets`` ``[N]`` under ``logits`` ``[N, V]``, in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sum_by_sequence(values: Any, owners: Any, sequences: int) -> tuple[Any, Any]:
    """Per-sequence sums of per-token ``values`` ``[N]`` whose sequences are ``owners`` ``[N]``,
    and the number of tokens of each: ``(sums [sequences] float32, counts [sequences])``."""
    import torch

    sums = torch.zeros(sequences, dtype=torch.float32, device=values.device).index_add(0, owners, values.float())
    counts = torch.zeros(sequences, dtype=torch.long, device=values.device).index_add(
        0, owners, torch.ones_like(owners))
    return sums, counts


def sequence_logps(logits: Any, labels: Any, sequence_index: Any, sequences: int) -> tuple[Any, Any]:
    """Per-sequence sums of the labelled tokens' log-probabilities and their counts.

    ``logits`` ``[rows, T, V]`` and unshifted ``labels`` ``[rows, T]`` (-100: not scored; logit
    ``t`` predicts ``labels[t + 1]``); ``sequence_index`` ``[rows, T]`` names the sequence each
    token belongs to (several per row when packed; -1 for padding), so packed sequences are summed
    separately. Returns ``(logps [sequences], tokens [sequences])`` in float32."""
    targets = labels[:, 1:]
    owners = sequence_index[:, 1:]
    scored = (targets != -100) & (owners >= 0)
    return sum_by_sequence(token_logps(logits[:, :-1][scored], targets[scored]), owners[scored], sequences)
