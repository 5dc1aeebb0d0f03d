"""Context parallelism (``components/distributed/context_parallel.py``): zig-zag sharding, the
batch splitter, and attention over a split sequence equal to attention over the whole one.

Fast tests run in one process (cp ranks simulated by giving each rank's queries the keys an
all-gather would deliver); the slow test runs cp=2 on 2 real processes (torchrun + gloo) and
compares loss and every gradient with one process running transformers' own sdpa attention.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from automodel_cli.components.data.collate import SFTCollator
from automodel_cli.components.distributed import context_parallel as cp
from automodel_cli.components.loss.targets import shift_labels
from automodel_cli.errors import UserError

from tests.components.distributed.test_distributed_parity import WORKER, _launch

CP_WORKER = WORKER.with_name("_cp_worker.py")


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [1, 2])
def test_zigzag_split_unsplit_round_trip(cp_size, dim):
    tensor = torch.randn(2, 24, 24, 3)
    parts = [cp.zigzag_split(tensor, cp_size, rank, dim=dim) for rank in range(cp_size)]
    assert all(p.size(dim) == 24 // cp_size for p in parts)
    assert torch.equal(cp.zigzag_unsplit(parts, dim=dim), tensor)


def test_zigzag_layout_balances_causal_work():
    assert cp.zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp.zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp.gathered_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    # Query i attends to i + 1 keys: every rank gets the same number of (query, key) pairs.
    work = [int((cp.zigzag_indices(48, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_sequence_not_divisible_is_a_user_error():
    with pytest.raises(UserError) as caught:
        cp.shard_batch({"input_ids": torch.zeros(1, 10, dtype=torch.long)}, 3, 0)
    text = caught.value.render()
    assert "cp=3" in text and "10" in text and "multiple of 6" in text and "12" in text


def test_targets_are_shifted_over_the_whole_row_before_splitting():
    labels = torch.arange(100, 116).unsqueeze(0)
    labels[0, :3] = -100
    batch = {"input_ids": torch.arange(16).unsqueeze(0), "labels": labels,
             "num_label_tokens": (labels[:, 1:] != -100).sum()}  # as SFTCollator counts: 13
    shards = [cp.shard_batch(batch, 2, rank) for rank in range(2)]
    # Rank 0 holds tokens 0-3 and 12-15: token 3's target is label 4, on the other rank.
    assert shards[0]["targets"][0, 3] == 104
    assert shards[0]["targets"][0, -1] == -100  # the row's last token predicts nothing
    assert torch.equal(cp.zigzag_unsplit([s["targets"] for s in shards]), shift_labels(labels))
    assert shards[1]["position_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]  # global positions: RoPE exact
    assert sum(int(cp.local_label_tokens(s["targets"])) for s in shards) == 13
    assert all(int(s["num_label_tokens"]) == 13 for s in shards)


def test_batch_keys_that_cannot_be_split_are_refused():
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "pixel_values": torch.zeros(3, 3, 4, 4)}
    with pytest.raises(ValueError, match="pixel_values"):
        cp.shard_batch(batch, 2, 0)


def _reference_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal, same-document (a document starts where a position is 0), real keys only: built
    entry by entry, independently of the module."""
    rows, length = position_ids.shape
    mask = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    for b in range(rows):
        document = torch.cumsum(position_ids[b] == 0, 0)
        for i in range(length):
            for j in range(i + 1):
                mask[b, 0, i, j] = bool(document[i] == document[j] and (attention_mask[b, j] or i == j))
    return mask


def test_simulated_cp2_attention_equals_full_attention_with_gqa_and_documents():
    """Each simulated rank attends with its own queries to the keys an all-gather delivers (every
    rank's shard, in rank order) and its mask from ``shard_batch``: together they give exactly
    the attention of the whole sequence, across document boundaries and padding."""
    torch.manual_seed(0)
    rows, length, heads, kv_heads, dim, cp_size = 2, 16, 4, 2, 8, 2
    query = torch.randn(rows, heads, length, dim)
    key, value = torch.randn(2, rows, kv_heads, length, dim)
    position_ids = torch.tensor([[*range(5), *range(7), *range(4)], [*range(13), *range(3)]])
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, 13:] = 0  # right padding (packed rows' padding is a document of its own)
    batch = {"input_ids": torch.zeros(rows, length, dtype=torch.long), "position_ids": position_ids,
             "attention_mask": attention_mask}

    gathered_key = torch.cat([cp.zigzag_split(key, cp_size, r, dim=2) for r in range(cp_size)], dim=2)
    gathered_value = torch.cat([cp.zigzag_split(value, cp_size, r, dim=2) for r in range(cp_size)], dim=2)
    outputs = []
    for rank in range(cp_size):
        shard = cp.shard_batch(batch, cp_size, rank)["cp_shard"]
        local_query = cp.zigzag_split(query, cp_size, rank, dim=2)
        outputs.append(cp.attend(local_query, gathered_key, gathered_value, shard.mask, scaling=0.3))
    got = cp.zigzag_unsplit(outputs, dim=1)

    repeat = heads // kv_heads
    want = F.scaled_dot_product_attention(
        query, key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1),
        attn_mask=_reference_mask(position_ids, attention_mask), scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_single_rank_model_matches_transformers_packed_attention():
    """cp=1 through a real model: the shard reaches every layer's attention through the model's
    keyword arguments, and document isolation matches what transformers infers from
    ``position_ids`` for its own sdpa attention."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    samples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
               {"input_ids": [10, 11, 12], "labels": [10, 11, 12]}]
    batch = SFTCollator(pad_token_id=0, packed=True, pad_to_multiple_of=8)(samples)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    split = cp.use_context_parallel_attention(copy.deepcopy(model))
    shard = cp.shard_batch(batch, 1, 0)
    with torch.no_grad():
        got = split(input_ids=shard["input_ids"], position_ids=shard["position_ids"],
                    cp_shard=shard["cp_shard"], use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(RuntimeError, match="cp_shard"):
        split(input_ids=shard["input_ids"], use_cache=False)


def test_sliding_window_models_are_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=64, sliding_window=4)
    with pytest.raises(UserError, match="sliding-window"):
        cp.use_context_parallel_attention(AutoModelForCausalLM.from_config(config))


#: Relative to each quantity's magnitude: the split run adds float32 sums in another order than
#: one process (a few ulps, ~1e-7 relative); a wrong mask, a lost key/value gradient or a double
#: counted token changes them by far more than 1e-4.
TOL = 1e-4
CASES = ["llama", "llama_packed", "qwen3", "qwen3_packed", "llama_packed_ac"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(2, CASES, tmp_path_factory.mktemp("cp2") / "results.json", worker=CP_WORKER)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_cp2_loss_and_gradients_equal_one_process(two_ranks, case):
    result = two_ranks[case]
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOL)
    assert len(result["grad_rel_errors"]) > 10  # every parameter was compared
    worst = max(result["grad_rel_errors"], key=result["grad_rel_errors"].get)
    assert result["grad_rel_errors"][worst] < TOL, f"gradient of {worst}"
    assert result["logits_rel_error"] < TOL  # gather_sequence restores the original order
    assert result["tokens_summed"] == result["tokens_batch"]  # local counts add up to the batch's
    assert result["local_tokens"] * 2 == result["seq_len"]
    if case.endswith("_ac"):  # the shard reached the recomputation in the backward pass
        assert result["checkpointing"] and result["attention_calls"] == 4
    else:
        assert result["attention_calls"] == 2
