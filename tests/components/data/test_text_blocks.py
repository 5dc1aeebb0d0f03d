"""Pre-training blocks: documents end to end, cut into fixed-length blocks, attention kept inside
each document; the streaming reader gives the same blocks and resumes at any saved position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import demo_tokenizer  # noqa: F401  (fixture)
from automodel_cli.components.data.text import (BlockStream, DocumentEncoder, TokenArrays, TokenBlocks,
                                                collate_blocks, document_reader, tokenize_corpus)
from automodel_cli.errors import UserError
from tolerances import assert_close_f32, decoder_rounding

TEXTS = ["the cat sat.", "", "count: 1 2 3 4 5 6 7 8 9 10 11 12.", "ab", "   ",
         "once there was a fox named lily. lily lived by the river.", "sums: 1 + 2 = 3.", "z"]


def arrays_of(documents: list[list[int]]) -> TokenArrays:
    starts = np.cumsum([0] + [len(d) for d in documents])
    return TokenArrays(np.array([t for d in documents for t in d], dtype=np.int32), starts)


def test_block_layout_by_hand():
    # documents of 3, 5 and 4 tokens -> 12 tokens -> two blocks of 5 (2 tokens dropped)
    blocks = TokenBlocks(arrays_of([[10, 11, 12], [20, 21, 22, 23, 24], [30, 31, 32, 33]]), 5)
    assert len(blocks) == 2
    first, second = blocks[0], blocks[1]
    assert first["input_ids"].tolist() == [10, 11, 12, 20, 21]
    assert first["position_ids"].tolist() == [0, 1, 2, 0, 1]  # restarts where document 2 starts
    assert first["labels"].tolist() == [-100, 11, 12, -100, 21]  # nothing predicts a document's start
    assert first["label_tokens"] == 3
    # the block starts inside document 2: its positions start at 0 and document 3 restarts them
    assert second["input_ids"].tolist() == [22, 23, 24, 30, 31]
    assert second["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert second["labels"].tolist() == [-100, 23, 24, -100, 31]
    head, tail = blocks.split_tail(1)
    assert len(head) == 1 and tail[0]["input_ids"].tolist() == [22, 23, 24, 30, 31]


def test_documents_are_bos_text_eos_and_blank_ones_are_skipped(demo_tokenizer):
    from datasets import Dataset

    arrays = tokenize_corpus(Dataset.from_dict({"text": TEXTS}), demo_tokenizer, "text")
    bos, eos = demo_tokenizer.bos_token_id, demo_tokenizer.eos_token_id
    kept = [t for t in TEXTS if t.strip()]
    assert arrays.n_documents == len(kept)
    for i, text in enumerate(kept):
        doc = arrays.tokens[arrays.starts[i]:arrays.starts[i + 1]].tolist()
        assert doc == [bos, *demo_tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    with pytest.raises(UserError, match="column `text` holds int"):
        DocumentEncoder(demo_tokenizer).encode(["ok", 7], [0, 1], "text")


@pytest.mark.parametrize("block_size", [4, 7, 16])
def test_stream_gives_the_same_blocks_and_resumes_at_every_position(demo_tokenizer, block_size):
    from datasets import Dataset

    table = Dataset.from_dict({"text": TEXTS * 3})
    blocks = TokenBlocks(tokenize_corpus(table, demo_tokenizer, "text"), block_size)
    opener = document_reader(table.to_iterable_dataset(), demo_tokenizer, "text", batch_size=3)
    stream = BlockStream(opener, block_size)
    positions = []
    for i in range(len(blocks) + 3):  # into the second pass
        positions.append(stream.position)
        block = stream.next_block()
        expected = blocks[i % len(blocks)]
        for key in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(block[key], expected[key]), (i, key)
    assert stream.position.epoch == 1
    for i, position in enumerate(positions):
        resumed = BlockStream(opener, block_size, position)
        assert np.array_equal(resumed.next_block()["input_ids"], blocks[i % len(blocks)]["input_ids"])


def test_stream_too_small_for_one_block_is_a_user_error(demo_tokenizer):
    from datasets import Dataset

    opener = document_reader(Dataset.from_dict({"text": ["ab"]}), demo_tokenizer, "text")
    with pytest.raises(UserError, match="fewer tokens than one block of 64"):
        BlockStream(opener, 64).next_block()


def test_attention_stays_inside_each_document(demo_tokenizer):
    """A document's logits inside a block equal its logits on its own (sdpa), so no token sees
    the previous document; without position ids the same block leaks across documents."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(demo_tokenizer), max_position_embeddings=64,
        attn_implementation="sdpa")).eval()
    encoder = DocumentEncoder(demo_tokenizer)
    docs = encoder.encode(["the cat sat on the mat.", "count: 1 2 3."], [0, 1], "text")
    block_size = len(docs[0]) + len(docs[1])
    batch = collate_blocks([TokenBlocks(arrays_of(docs), block_size)[0]])
    start = len(docs[0])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([docs[1]]), use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert_close_f32(packed[0, start:], alone[0],
                     **decoder_rounding(layers=2, hidden=64, intermediate=128, positions=block_size))
    assert not torch.allclose(leaky[0, start:], alone[0], atol=1e-3)
    assert batch["num_label_tokens"] == block_size - 2
