"""VLMCollator: per-token keys padded, image tensors concatenated in sample order, text-only
samples mixed in; packing of image-text samples refused."""

from __future__ import annotations

import pytest
import torch

from automodel_cli.components.data import VLMCollator, refuse_packing
from automodel_cli.errors import UserError

IGNORE = -100


def _qwen_like(ids, n_patches, grid):
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:], "mm_token_type_ids": [1] * len(ids),
            "pixel_values": torch.full((n_patches, 6), float(ids[0])), "image_grid_thw": torch.tensor([grid])}


def test_pads_per_token_keys_and_concatenates_images_in_order():
    samples = [_qwen_like([1, 2, 3], 4, [1, 2, 2]),
               {"input_ids": [7, 8, 9, 10, 11], "labels": [IGNORE, IGNORE, 9, 10, 11],
                "mm_token_type_ids": [0] * 5},  # text only
               _qwen_like([5, 6], 8, [1, 2, 4])]
    batch = VLMCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 10, 11], [5, 6, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE], [IGNORE, IGNORE, 9, 10, 11],
                                        [IGNORE, 6, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[1, 1, 1, 0, 0], [0] * 5, [1, 1, 0, 0, 0]]
    assert batch["pixel_values"].shape == (12, 6)
    assert batch["pixel_values"][:4].eq(1).all() and batch["pixel_values"][4:].eq(5).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert batch["num_label_tokens"].item() == 2 + 3 + 1


def test_gemma_like_samples_pad_token_type_ids_with_zero_and_stack_images():
    samples = [{"input_ids": [1, 4, 4, 2], "labels": [IGNORE, IGNORE, IGNORE, 2], "token_type_ids": [0, 1, 1, 0],
                "pixel_values": torch.zeros(1, 3, 28, 28)},
               {"input_ids": [1, 4, 4, 4, 4, 2, 3], "labels": [IGNORE] * 6 + [3], "token_type_ids": [0, 1, 1, 1, 1, 0, 0],
                "pixel_values": torch.ones(2, 3, 28, 28)}]
    batch = VLMCollator(pad_token_id=0, pad_to_multiple_of=4)(samples)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["pixel_values"][0].eq(0).all()


def test_a_batch_without_images_has_no_image_tensors():
    batch = VLMCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [IGNORE, 2]}])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_label_tokens"}


def test_mismatched_per_token_lengths_are_a_bug():
    with pytest.raises(ValueError, match="token_type_ids"):
        VLMCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [IGNORE, 2], "token_type_ids": [0]}])


def test_packing_image_text_samples_is_refused():
    refuse_packing([{"input_ids": [1], "labels": [1], "mm_token_type_ids": [0]}])  # text only: fine
    with pytest.raises(UserError, match="data.packing=true cannot pack image-text samples") as info:
        refuse_packing([_qwen_like([1, 2], 4, [1, 2, 2])])
    assert "data.packing=false" in info.value.hint


def test_collates_real_encoded_samples(gemma3_processor, tmp_path):
    """End to end with the processor's own outputs: the batch feeds a model's input names."""
    from automodel_cli.components.data.multimodal import encode_multimodal, load_multimodal

    from data_fixtures import write_jsonl
    from vlm_fixtures import save_image

    save_image(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "b"}]}]
    table = load_multimodal(str(write_jsonl(tmp_path / "t.jsonl", rows)), "train", {})
    samples, _ = encode_multimodal(table, gemma3_processor, max_length=128)
    batch = VLMCollator(gemma3_processor.tokenizer.pad_token_id)(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "token_type_ids", "pixel_values", "num_label_tokens"}
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    assert int(batch["token_type_ids"].sum()) == 4  # image_seq_length of the tiny processor


from vlm_fixtures import gemma3_processor  # noqa: E402,F401  (fixture)
