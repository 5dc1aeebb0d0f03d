"""The padding report equals what the collator really builds, micro-batch by micro-batch."""

from __future__ import annotations

import random

import pytest

from automodel_cli.components.data import SFTCollator, pack_sequences
from automodel_cli.components.training.padding import Padding, batch_padding, run_padding, step_padding
from automodel_cli.components.training.steps import StepPlan, micro_batches


def samples(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 60)
        ids = [rng.randint(3, 99) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return out


@pytest.mark.parametrize("packed, flatten, multiple", [(False, False, None), (False, False, 8),
                                                       (True, False, None), (True, True, None), (True, False, 4)])
def test_batch_padding_equals_the_collated_batch(packed, flatten, multiple):
    data = samples(40)
    if packed:
        data = pack_sequences([s["input_ids"] for s in data], [s["labels"] for s in data], 128)
    collate = SFTCollator(0, packed=packed, pad_to_multiple_of=multiple, flatten=flatten)
    lengths = [len(s["input_ids"]) for s in data]
    rng = random.Random(1)
    for _ in range(20):
        group = rng.sample(range(len(data)), k=min(len(data), rng.randint(1, 6)))
        batch = collate([data[i] for i in group])
        expected = batch_padding([lengths[i] for i in group], collate)
        assert expected.slots == batch["input_ids"].numel()
        assert expected.tokens == sum(lengths[i] for i in group)
        if not packed:
            assert expected.tokens == int(batch["attention_mask"].sum())


def test_run_padding_is_the_sum_over_each_steps_micro_batches():
    data = samples(64)
    lengths = [len(s["input_ids"]) for s in data]
    collate = SFTCollator(0, packed=False)
    plan = StepPlan(len(data), 16, seed=3)
    per_step = run_padding(plan, lengths, 4, range(6), collate)
    assert len(per_step) == 6
    for step, stats in enumerate(per_step):
        slots = tokens = 0
        for group in micro_batches(plan.samples(step), lengths, 4):
            batch = collate([data[i] for i in group])
            slots += batch["input_ids"].numel()
            tokens += int(batch["attention_mask"].sum())
        assert (stats.slots, stats.tokens) == (slots, tokens)
    total = sum(per_step, Padding())
    assert 0 < total.fraction < 1 and total.padded == total.slots - total.tokens


def test_grouping_by_length_and_packing_reduce_padding():
    data = samples(64)
    lengths = [len(s["input_ids"]) for s in data]
    collate = SFTCollator(0, packed=False)
    random_groups = [list(range(i, i + 4)) for i in range(0, 64, 4)]
    grouped = micro_batches(list(range(64)), lengths, 4)
    assert step_padding(grouped, lengths, collate).fraction < step_padding(random_groups, lengths, collate).fraction
    packs = pack_sequences([s["input_ids"] for s in data], [s["labels"] for s in data], 256)
    pack_lengths = [len(p["input_ids"]) for p in packs]
    flat = SFTCollator(0, packed=True, flatten=True)
    assert step_padding([list(range(len(packs)))], pack_lengths, flat).fraction == 0.0
