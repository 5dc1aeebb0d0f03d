"""Turn a list of tokenised samples (or packs) into a batch of tensors.

Unpacked: right-padded ``input_ids``, ``labels`` (-100 on padding) and an ``attention_mask``.

Packed: ``input_ids``, ``labels`` and ``position_ids`` and deliberately *no* attention mask:
transformers only infers the block-diagonal (per-document) mask from ``position_ids`` resets
when ``attention_mask`` is None and no KV cache is built, so call the model with
``use_cache=False`` (packing.py explains why). Padding at the end of a row is given positions ``0, 1, ...``
so it forms its own dummy document that no real token attends to. ``flatten=True`` concatenates
all packs of the batch into a single row, which the flash-attention varlen path needs (it only
reads packed boundaries from ``position_ids`` when the batch size is 1) and which wastes no
padding at all.

Every batch also carries ``num_label_tokens``: the number of labels the loss counts (after the
causal shift). Summing per-token losses and dividing by the total over all micro-batches of an
optimizer step gives the same loss whatever the micro-batch split or padding; pop it before
calling the model, or pass it as ``num_items_in_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100


class SFTCollator:
    """Callable: ``collator(samples) -> dict[str, torch.Tensor]`` (see module docstring)."""

    def __init__(
        self,
        pad_token_id: int,
        packed: bool,
        pad_to_multiple_of: int | None = None,
        *,
        flatten: bool = False,
    ):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; use the tokenizer's pad (or eos) token id")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if flatten and not packed:
            raise ValueError("flatten=True needs packed=True (position ids mark the documents)")
        self.pad_token_id = int(pad_token_id)
        self.packed = packed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flatten = flatten

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows = [self._row(s) for s in samples]
        if self.flatten:
            rows = [tuple(sum((list(r[k]) for r in rows), []) for k in range(3))]
        width = self._padded_length(max(len(r[0]) for r in rows))

        input_ids, labels, extra = [], [], []
        for ids, lab, pos in rows:
            pad = width - len(ids)
            input_ids.append(list(ids) + [self.pad_token_id] * pad)
            labels.append(list(lab) + [IGNORE_INDEX] * pad)
            if self.packed:
                extra.append(list(pos) + list(range(pad)))  # padding = a separate dummy document
            else:
                extra.append([1] * len(ids) + [0] * pad)

        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        batch["position_ids" if self.packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        batch["num_label_tokens"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return batch

    def _row(self, sample: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
        ids = sample["input_ids"]
        lab = sample["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"sample has {len(ids)} input ids but {len(lab)} labels")
        if not self.packed:
            return ids, lab, []
        pos = sample.get("position_ids")
        if pos is None:  # an unpacked sample in packed mode is a pack of one document
            pos = range(len(ids))
        return ids, lab, pos

    def _padded_length(self, length: int) -> int:
        m = self.pad_to_multiple_of
        return length if not m else -(-length // m) * m


#: Per-token keys of VLM samples and their padding values (``attention_mask`` is built here).
VLM_TOKEN_PADDING = {"labels": IGNORE_INDEX, "token_type_ids": 0, "mm_token_type_ids": 0}


class VLMCollator:
    """Callable: ``collator(samples) -> dict[str, torch.Tensor]`` for vision-language samples
    (``multimodal.encode_multimodal``): per-token keys are right-padded to the longest sample
    (``input_ids`` with the pad id, ``labels`` with -100, ``token_type_ids`` and
    ``mm_token_type_ids`` with 0) and an ``attention_mask`` is added; every other key is an image
    tensor whose first dimension counts images or patches (``pixel_values``, ``image_grid_thw``),
    concatenated along it in sample order, which is how the models match image features to the
    image tokens of the batch. Text-only samples add no image tensors; a batch without images has
    none. Packing is not offered (``refuse_packing``). Carries ``num_label_tokens`` like
    ``SFTCollator``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; use the tokenizer's pad (or eos) token id")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not samples:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(s["input_ids"]) for s in samples)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest
        padding = {"input_ids": self.pad_token_id, **VLM_TOKEN_PADDING}
        token_keys = [k for k in padding if any(k in s for s in samples)]
        batch: dict[str, Any] = {}
        for key in token_keys:
            rows = []
            for sample in samples:
                values = list(sample[key]) if key in sample else [padding[key]] * len(sample["input_ids"])
                if len(values) != len(sample["input_ids"]):
                    raise ValueError(f"sample has {len(sample['input_ids'])} input ids but {len(values)} {key}")
                rows.append(values + [padding[key]] * (width - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
        batch["attention_mask"] = torch.tensor(
            [[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples], dtype=torch.long)
        image_keys = sorted({k for s in samples for k in s} - set(padding) - {"attention_mask"})
        for key in image_keys:
            batch[key] = torch.cat([torch.as_tensor(s[key]) for s in samples if key in s], dim=0)
        batch["num_label_tokens"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return batch


def refuse_packing(samples: Sequence[dict[str, Any]]) -> None:
    """data.packing lays samples end to end in one row; the vision-language models here find
    their images by position in the batch and build per-image attention and rotary positions
    that packing would break, so packed image-text training is refused rather than run wrong."""
    from automodel_cli.errors import UserError

    if any(key not in ("input_ids", "labels", *VLM_TOKEN_PADDING) for s in samples for key in s):
        raise UserError(
            "data.packing=true cannot pack image-text samples: the model matches images to image "
            "tokens per sequence, which packed sequences would mix up.",
            "Set data.packing=false for vision-language fine-tuning (batches are padded instead; "
            "train.micro_batch_size groups samples of similar length).",
        )
