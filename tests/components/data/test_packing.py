"""pack_sequences: best-fit-decreasing placement, document boundaries, efficiency."""

from __future__ import annotations

import random

import pytest

from automodel_cli.components.data import pack_sequences, packing_efficiency, padding_fraction

IGNORE = -100


def docs(lengths, start=1):
    """Documents with distinct token ids (doc k uses ids k*100 + j) and fully trained labels."""
    ids = [[(k + start) * 100 + j for j in range(n)] for k, n in enumerate(lengths)]
    return ids, [list(x) for x in ids]


def members(pack):
    """Indices of the documents in a pack, read back from the first token of each."""
    out, offset = [], 0
    for n in pack["seq_lengths"]:
        out.append(pack["input_ids"][offset] // 100 - 1)
        offset += n
    return out


def test_best_fit_decreasing_placement():
    # 7 -> bin0 (free 3); 4, 4 -> bin1 (free 2); first 2 -> bin1 (tightest fit, free 2 -> 0;
    # first-fit would pick bin0); second 2 -> bin0 (free 1); 1 -> bin0 (free 0).
    packs = pack_sequences(*docs([7, 4, 4, 2, 2, 1]), max_length=10)
    assert [members(p) for p in packs] == [[0, 4, 5], [1, 2, 3]]
    assert [p["seq_lengths"] for p in packs] == [[7, 2, 1], [4, 4, 2]]
    assert packing_efficiency(packs, 10) == 1.0 and padding_fraction(packs, 10) == 0.0


def test_opens_new_pack_when_nothing_fits_and_ties_go_to_older_pack():
    packs = pack_sequences(*docs([5, 5, 5, 3, 3]), max_length=8)
    # 5,5,5 each open a pack (free 3,3,3); the 3s fill the two oldest packs.
    assert [members(p) for p in packs] == [[0, 3], [1, 4], [2]]
    assert packing_efficiency(packs, 8) == pytest.approx(21 / 24)
    assert padding_fraction(packs, 8) == pytest.approx(3 / 24)


def test_pack_contents_positions_and_boundary_labels():
    ids, labels = docs([3, 2])
    labels[1][0] = IGNORE  # already-masked first label stays masked
    labels[0][1] = IGNORE  # an inner masked label is preserved
    (pack,) = pack_sequences(ids, labels, max_length=8)
    assert pack["input_ids"] == [100, 101, 102, 200, 201]
    assert pack["position_ids"] == [0, 1, 2, 0, 1]
    assert pack["seq_lengths"] == [3, 2]
    # first label of every document masked: the previous document's last token must not be
    # trained to predict it (HF shifts labels inside the loss)
    assert pack["labels"] == [IGNORE, IGNORE, 102, IGNORE, 201]
    # inputs are not mutated
    assert labels[0] == [100, IGNORE, 102]


def test_random_documents_are_all_packed_exactly_once_and_deterministically():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    ids, labels = docs(lengths)
    packs = pack_sequences(ids, labels, max_length=64)
    assert packs == pack_sequences(ids, labels, max_length=64)
    assert sorted(i for p in packs for i in members(p)) == list(range(300))
    for p in packs:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == sum(p["seq_lengths"]) <= 64
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][s] == IGNORE for s in starts)
    assert packing_efficiency(packs, 64) > 0.95  # BFD is tight on uniform lengths
    lower_bound = -(-sum(lengths) // 64)
    assert lower_bound <= len(packs) <= lower_bound + 1


def test_too_long_document_and_mismatched_rows_raise():
    with pytest.raises(ValueError, match="document 1 has 9 tokens > max_length=8"):
        pack_sequences(*docs([3, 9]), max_length=8)
    with pytest.raises(ValueError, match="2 input_ids rows but 1 labels rows"):
        pack_sequences([[1], [2]], [[1]], max_length=8)
    assert pack_sequences([], [], max_length=8) == []
    assert packing_efficiency([], 8) == 0.0
