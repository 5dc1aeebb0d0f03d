"""How much of a run's compute goes to padding.

The figure is over the micro-batches exactly as they are collated: each step's samples (or packs)
are cut into micro-batches by ``steps.micro_batches`` and every row of a micro-batch is padded to
its longest row (rounded up to ``pad_to_multiple_of``; one row per micro-batch when packs are
laid end to end with ``flatten``). Padding fraction = padded positions / all positions. Step
plans are pure functions of the step number, so the whole run's figure is known before training
starts, on every rank alike; ``tests/components/training/test_padding.py`` checks it against the
collator's real output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Padding:
    tokens: int = 0  # real (non-padding) tokens
    slots: int = 0  # positions in the collated micro-batches, padding included

    @property
    def padded(self) -> int:
        return self.slots - self.tokens

    @property
    def fraction(self) -> float:
        return self.padded / self.slots if self.slots else 0.0

    def __add__(self, other: Padding) -> Padding:
        return Padding(self.tokens + other.tokens, self.slots + other.slots)

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": round(self.fraction, 6), "tokens": self.tokens, "padded": self.padded,
                "slots": self.slots}


def batch_padding(lengths: Sequence[int], collate: Any) -> Padding:
    """Padding of the micro-batch ``collate`` builds from samples of these ``lengths``
    (``collate`` is an ``SFTCollator``; its ``flatten`` and ``pad_to_multiple_of`` matter)."""
    if not lengths:
        return Padding()
    rows = [sum(lengths)] if getattr(collate, "flatten", False) else list(lengths)
    multiple = getattr(collate, "pad_to_multiple_of", None) or 1
    width = -(-max(rows) // multiple) * multiple
    return Padding(sum(lengths), width * len(rows))


def step_padding(groups: Iterable[Sequence[int]], lengths: Sequence[int], collate: Any) -> Padding:
    """Padding of one optimizer step, given its micro-batches (lists of sample indices)."""
    total = Padding()
    for group in groups:
        total = total + batch_padding([lengths[i] for i in group], collate)
    return total


def run_padding(plan: Any, lengths: Sequence[int], micro_batch_size: int, steps: Iterable[int],
                collate: Any) -> list[Padding]:
    """Per-step padding for ``steps`` of a ``StepPlan`` (all data-parallel ranks together)."""
    from automodel_cli.components.training.steps import micro_batches

    return [step_padding(micro_batches(plan.samples(step), lengths, micro_batch_size), lengths, collate)
            for step in steps]
