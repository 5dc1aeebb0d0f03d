"""Context parallelism in a recipe's step (``distributed.cp``): the pieces finetune and pretrain share.

The component (``components/distributed/context_parallel.py``) splits one batch over the cp
group and attends across the split; here a run uses it:

* ``pad_multiple``: batches are padded to a multiple of ``2 * cp`` (the zig-zag chunks); under
  sequence parallelism each rank's ``T / cp`` tokens are split again over tp, so of
  ``lcm(2 * cp, cp * tp)``;
* ``micro_batch_loss``: this rank's part of a micro-batch's loss. The collated batch (labels in
  the Hugging Face layout) is shifted over the whole row, then split; the loss gets the local
  ``targets`` already shifted (``training_loss(..., shifted=True)``) and is normalised by the
  step's trained tokens counted once per sample, so the sum over dp x cp is the step's loss;
* ``whole_sequences``: validation runs unsplit -- every rank evaluates the same whole batches with
  the model's own attention for the duration of the block (cp peers repeat the work; the result
  is exactly the single-process one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from automodel_cli.errors import UserError

#: Recipes whose steps split sequences over a cp group.
CP_RECIPES = ("finetune", "pretrain")


def pad_multiple(cp: int, tp: int, sequence_parallel: bool) -> int | None:
    """The multiple every batch's sequence length is padded to (None: no constraint)."""
    split = tp if sequence_parallel and tp > 1 else 1
    multiple = math.lcm(2 * cp, cp * split) if cp > 1 else split
    return multiple if multiple > 1 else None


def check_recipe(recipe: str, cp: int) -> None:
    """UserError for ``distributed.cp > 1`` with a recipe whose step does not split sequences."""
    if cp > 1 and recipe not in CP_RECIPES:
        raise UserError(
            f"distributed.cp={cp} (context parallelism) is supported by {' and '.join(CP_RECIPES)}, "
            f"not by `automodel {recipe}`.",
            "Set distributed.cp=1 for this command.",
        )


def micro_batch_loss(run: Any, model: Any, inputs: dict[str, Any], labels: Any, label_tokens: int) -> Any:
    """``training_loss`` of one micro-batch on this rank: the whole batch without context
    parallelism, else this rank's zig-zag part of it (``inputs`` on the device, ``labels`` in the
    Hugging Face layout)."""
    from automodel_cli.components.distributed.context_parallel import shard_batch
    from automodel_cli.components.loss.head import training_loss

    if run.cp_size == 1:
        return training_loss(model, inputs, labels, label_tokens, run.loss_spec, run.precision.autocast)
    if run.balance is not None:
        raise UserError(
            f"distributed.cp={run.cp_size} cannot train a mixture-of-experts model: its router balance "
            "loss needs every token of a sequence on one rank.",
            "Set distributed.cp=1 for this model.",
        )
    shard = shard_batch({**inputs, "labels": labels}, run.cp_size, run.cp_rank, run.cp_group)
    targets = shard.pop("targets")
    return training_loss(model, shard, targets, label_tokens, run.loss_spec, run.precision.autocast, shifted=True)


@contextlib.contextmanager
def whole_sequences(model: Any, cp: int) -> Iterator[None]:
    """For the block, ``model`` attends with sdpa over whole, unsplit batches (validation,
    generation); afterwards with the context-parallel attention again. A no-op for cp=1."""
    from automodel_cli.components.distributed.context_parallel import ATTENTION
    from automodel_cli.components.models.structure import unwrap

    if cp == 1:
        yield
        return
    bare = unwrap(model)
    bare.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        bare.set_attn_implementation(ATTENTION)
