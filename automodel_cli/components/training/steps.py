"""Which samples each optimizer step sees.

The data order is a pure function of (seed, epoch), and a step's samples a pure function of the
step number, so resuming needs nothing but the step: no sampler state to save, and a resumed run
sees exactly the samples the uninterrupted run would have seen.

``global_batch_size`` samples make one optimizer step whatever the number of devices; they are
cut into micro-batches of ``micro_batch_size``. Samples are grouped by length inside a step
before cutting, which removes most padding without changing the math: the loss of a step is
normalised by its total label-token count, so the grouping inside a step does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from automodel_cli.errors import UserError


@dataclass
class StepPlan:
    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch_size:
            raise UserError(
                f"The training data has {self.num_samples} samples (after packing, if on), fewer "
                f"than one step of train.global_batch_size={self.global_batch_size}.",
                "Lower train.global_batch_size or add data.",
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            import torch

            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._cache = {epoch: torch.randperm(self.num_samples, generator=generator).tolist()}
            else:
                self._cache = {epoch: list(range(self.num_samples))}
        return self._cache[epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def samples(self, step: int) -> list[int]:
        """Indices of the samples of 0-based optimizer ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self.order(epoch)[start:start + self.global_batch_size]


def total_steps(plan: StepPlan, max_steps: int | None, epochs: int) -> int:
    return max_steps if max_steps is not None else plan.steps_per_epoch * epochs


def accumulation(global_batch_size: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per device per step; the sizes must divide evenly."""
    per_device, remainder = divmod(global_batch_size, world_size)
    if remainder or per_device % micro_batch_size:
        raise UserError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"train.micro_batch_size={micro_batch_size} x {world_size} device(s).",
            f"For example set train.global_batch_size={micro_batch_size * world_size * max(1, round(global_batch_size / (micro_batch_size * world_size)))}.",
        )
    return per_device // micro_batch_size


def micro_batches(indices: list[int], lengths: list[int], micro_batch_size: int) -> list[list[int]]:
    """Cut one step's samples into micro-batches of similar length (least padding)."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    return [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
