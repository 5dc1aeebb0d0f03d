"""SFTCollator: padding, masks, position ids of packed batches, label-token counts."""

from __future__ import annotations

import pytest
import torch

from automodel_cli.components.data import SFTCollator

IGNORE = -100


def test_unpacked_right_padding_and_attention_mask():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, IGNORE, 11, 12]},
    ]
    batch = SFTCollator(pad_token_id=0, packed=False)(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_label_tokens"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["num_label_tokens"].item() == 4


def test_pad_to_multiple_of():
    batch = SFTCollator(pad_token_id=3, packed=False, pad_to_multiple_of=8)(
        [{"input_ids": [1] * 9, "labels": [1] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 9:].tolist() == [3] * 7
    assert batch["labels"][0, 9:].tolist() == [IGNORE] * 7
    assert batch["num_label_tokens"].item() == 8  # labels[0] is never predicted


def test_packed_batch_pads_with_a_dummy_document():
    packs = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5],
         "position_ids": [0, 1, 2, 0, 1], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7], "labels": [IGNORE, 7], "position_ids": [0, 1], "seq_lengths": [2]},
    ]
    batch = SFTCollator(pad_token_id=0, packed=True, pad_to_multiple_of=4)(packs)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_label_tokens"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5] + [IGNORE] * 3, [IGNORE, 7] + [IGNORE] * 6]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["num_label_tokens"].item() == 4


def test_packed_flatten_concatenates_packs_into_one_row():
    packs = [
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2]},
        {"input_ids": [4, 5], "labels": [IGNORE, 5], "position_ids": [0, 1]},
    ]
    batch = SFTCollator(pad_token_id=0, packed=True, flatten=True)(packs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert batch["num_label_tokens"].item() == 3


def test_packed_mode_accepts_unpacked_samples():
    batch = SFTCollator(pad_token_id=0, packed=True)([{"input_ids": [4, 5, 6], "labels": [IGNORE, 5, 6]},
                                                     {"input_ids": [7], "labels": [IGNORE]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="pad_token_id is None"):
        SFTCollator(pad_token_id=None, packed=False)
    with pytest.raises(ValueError, match="flatten=True needs packed=True"):
        SFTCollator(pad_token_id=0, packed=False, flatten=True)
    with pytest.raises(ValueError, match="2 input ids but 1 labels"):
        SFTCollator(pad_token_id=0, packed=False)([{"input_ids": [1, 2], "labels": [1]}])
