"""Pack tokenised samples into ``max_length`` rows without cross-document attention.

Placement is best-fit decreasing (longest first; each document goes to the open pack whose free
space is smallest but sufficient, ties to the older pack). It is deterministic (stable sort,
index tie-breaks) and typically wastes only a few percent of each row.

Isolation relies on ``position_ids`` restarting at 0 at each document, with no attention mask:
in transformers 5.x ``masking_utils.find_packed_sequence_indices`` turns every position reset
into a new block of a block-diagonal causal mask for sdpa/eager/flex, and the flash attention
path derives ``cu_seqlens`` from the same resets (for a batch of one row; see
``SFTCollator(flatten=True)``). RoPE then sees the same positions as unpacked documents.
Caveat: the detection is skipped when a KV cache exists, and ``forward`` builds one whenever
``use_cache`` is true (the config default of most checkpoints, even in train mode), so the
model must be called with ``use_cache=False`` or documents silently attend to each other.

Labels: HF shifts them inside the loss (logit ``i`` predicts ``labels[i + 1]``), so in a pack
the last token of a document would be asked to predict the first token of the next one. Each
document's first label is therefore set to ``-100``; unpacked, that token is never predicted
either, so the packed loss equals the unpacked loss exactly (tests prove it with a real Llama).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

IGNORE_INDEX = -100


def pack_sequences(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    max_length: int,
) -> list[dict]:
    """Pack documents into rows of at most ``max_length`` tokens.

    Returns one dict per pack: ``input_ids``, ``labels`` (first label of every document
    masked), ``position_ids`` (restarting at 0 per document), ``seq_lengths`` (document
    lengths in order) and ``documents`` (the documents' indices in the input, same order). Packs are not padded; ``SFTCollator(packed=True)`` pads a batch.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} input_ids rows but {len(labels)} labels rows")
    lengths = [len(ids) for ids in input_ids]
    for i, (ids, lab) in enumerate(zip(input_ids, labels)):
        if len(ids) != len(lab):
            raise ValueError(f"document {i}: {len(ids)} input ids but {len(lab)} labels")
        if len(ids) > max_length:
            raise ValueError(
                f"document {i} has {len(ids)} tokens > max_length={max_length}; truncate first "
                "(tokenize_sft does)"
            )

    bins = _best_fit_decreasing(lengths, max_length)
    packs = []
    for members in bins:
        pack_ids: list[int] = []
        pack_labels: list[int] = []
        positions: list[int] = []
        for doc in members:
            ids, lab = list(input_ids[doc]), list(labels[doc])
            if lab:
                lab[0] = IGNORE_INDEX
            pack_ids += ids
            pack_labels += lab
            positions += range(len(ids))
        packs.append({
            "input_ids": pack_ids,
            "labels": pack_labels,
            "position_ids": positions,
            "seq_lengths": [lengths[doc] for doc in members],
            "documents": list(members),
        })
    return packs


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of document indices. Free space is kept in a sorted list of ``(free, bin_index)``
    so the tightest fitting bin is a binary search away."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted by (free space, bin index)
    for doc in order:
        need = lengths[doc]
        slot = bisect.bisect_left(free, (need, -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(doc)
        if space - need > 0:
            bisect.insort(free, (space - need, b))
    return bins


def packing_efficiency(packs: Sequence[dict], max_length: int) -> float:
    """Fraction of the ``len(packs) * max_length`` token slots holding real tokens."""
    if not packs:
        return 0.0
    used = sum(len(p["input_ids"]) for p in packs)
    return used / (len(packs) * max_length)


def padding_fraction(packs: Sequence[dict], max_length: int) -> float:
    """Fraction of slots that are padding when every pack is padded to ``max_length``."""
    return 1.0 - packing_efficiency(packs, max_length) if packs else 0.0
