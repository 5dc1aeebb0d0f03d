"""Packing must not change the maths: a real tiny LlamaForCausalLM gives the same logits and
the same loss for documents packed into rows as for the same documents padded one per row.

What makes it work in transformers 5.x (read from transformers/masking_utils.py):
``create_causal_mask`` -> ``_preprocess_mask_arguments`` calls
``find_packed_sequence_indices(position_ids)`` when ``attention_mask is None`` (and no cache);
every position that is not previous+1 starts a new sequence, and
``packed_sequence_compatibility_function`` turns the causal mask into a block-diagonal one for
sdpa/eager. The negative controls below show each ingredient is needed.
"""

from __future__ import annotations

import pytest
import torch

from data_fixtures import demo_tokenizer  # noqa: F401  (fixture)
from automodel_cli.components.data import SFTCollator, pack_sequences, tokenize_sft
from tolerances import assert_close_f32, decoder_rounding, f32_tol

IGNORE = -100


def rounding(vocab: int = 0, tokens: int = 0) -> dict[str, int]:
    """float32 rounding of the test model's logits, or of a loss over ``tokens`` (tests/tolerances.py)."""
    return decoder_rounding(layers=2, hidden=64, intermediate=128, positions=64, vocab=vocab, tokens=tokens)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token CE over label tokens (HF's shift), and the number of such tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return total, int((shift_labels != IGNORE).sum())


@pytest.fixture(scope="module")
def documents(demo_tokenizer):
    from datasets import Dataset

    rows = [{"prompt": f"reverse: {w}\n", "completion": w[::-1]}
            for w in ["abc", "hgfedcb", "jija", "bbcad", "ef", "abcdefghij", "dcc"]]
    dataset, _ = tokenize_sft(Dataset.from_list(rows), demo_tokenizer, max_length=64)
    return [list(x) for x in dataset["input_ids"]], [list(x) for x in dataset["labels"]]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(demo_tokenizer), max_position_embeddings=128,
        pad_token_id=demo_tokenizer.pad_token_id, attn_implementation=request.param,
    )
    model = LlamaForCausalLM(config).float().eval()
    assert model.config._attn_implementation == request.param
    return model


def run(model, batch, use_cache=False):
    batch = dict(batch)
    n = batch.pop("num_label_tokens")
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=n, use_cache=use_cache)
    return out, n


def unpacked_reference(model, pad_id, ids, labels):
    batch = SFTCollator(pad_id, packed=False)([{"input_ids": i, "labels": l} for i, l in zip(ids, labels)])
    out, n = run(model, batch)
    total, count = token_loss(out.logits, batch["labels"])
    assert count == n.item()
    return out, total, count


@pytest.mark.parametrize("flatten", [False, True])
def test_packed_logits_and_loss_equal_unpacked(model, demo_tokenizer, documents, flatten):
    ids, labels = documents
    pad_id = demo_tokenizer.pad_token_id
    ref_out, ref_total, ref_count = unpacked_reference(model, pad_id, ids, labels)

    packs = pack_sequences(ids, labels, max_length=64)
    assert len(packs) >= 2 and any(len(p["seq_lengths"]) >= 3 for p in packs)
    batch = SFTCollator(pad_id, packed=True, pad_to_multiple_of=8, flatten=flatten)(packs)
    out, n = run(model, batch)
    total, count = token_loss(out.logits, batch["labels"])

    assert count == ref_count == n.item()
    loss_rounding = rounding(model.config.vocab_size, count)
    assert_close_f32(total / count, ref_total / ref_count, **loss_rounding)
    # the model's own loss (sum / num_items_in_batch) agrees too
    assert_close_f32(out.loss, ref_out.loss, **loss_rounding)
    assert_close_f32(out.loss, ref_total / ref_count, **loss_rounding)

    # every document's logits in the pack equal its logits when run alone (padded)
    checked, flat_offset = 0, 0
    for r, pack in enumerate(packs):
        row, start = (0, flat_offset) if flatten else (r, 0)
        for n_tokens in pack["seq_lengths"]:
            doc = ids.index(batch["input_ids"][row, start:start + n_tokens].tolist())
            assert_close_f32(out.logits[row, start:start + n_tokens], ref_out.logits[doc, :n_tokens], **rounding())
            start += n_tokens
            checked += 1
        flat_offset += len(pack["input_ids"])
    assert checked == len(ids)


def test_without_position_resets_documents_leak_into_each_other(model, demo_tokenizer, documents):
    """Negative control: the same packs with plain 0..L-1 positions (ordinary causal attention)
    give different logits for every document after the first in a pack."""
    ids, labels = documents
    packs = pack_sequences(ids, labels, max_length=64)
    batch = SFTCollator(demo_tokenizer.pad_token_id, packed=True)(packs)
    good, _ = run(model, batch)
    leaky = dict(batch)
    leaky["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    bad, _ = run(model, leaky)
    first_len = packs[0]["seq_lengths"][0]
    assert_close_f32(bad.logits[0, :first_len], good.logits[0, :first_len], **rounding())
    assert (bad.logits[0, first_len:sum(packs[0]["seq_lengths"])] - good.logits[0, first_len:sum(packs[0]["seq_lengths"])]).abs().max() > 1e-3


def test_boundary_label_masking_is_what_makes_losses_equal(model, demo_tokenizer, documents):
    """With every token trained (pre-training style labels), pack_sequences' masking of each
    document's first label keeps packed == unpacked; without it the loss changes, because the
    last token of one document would be scored on predicting the next document's first token."""
    ids, _ = documents
    full_labels = [list(x) for x in ids]  # every label trained, including the first token
    pad_id = demo_tokenizer.pad_token_id
    _, ref_total, ref_count = unpacked_reference(model, pad_id, ids, full_labels)

    packs = pack_sequences(ids, full_labels, max_length=64)
    batch = SFTCollator(pad_id, packed=True)(packs)
    out, _ = run(model, batch)
    total, count = token_loss(out.logits, batch["labels"])
    assert count == ref_count
    assert_close_f32(total / count, ref_total / ref_count, **rounding(model.config.vocab_size, count))

    # same packs with the raw labels (no boundary masking): extra, cross-document targets
    naive = dict(batch)
    naive_labels = []
    for pack in packs:
        row, offset = [], 0
        for n_tokens in pack["seq_lengths"]:
            row += pack["input_ids"][offset:offset + n_tokens]
            offset += n_tokens
        naive_labels.append(row + [IGNORE] * (batch["labels"].shape[1] - len(row)))
    naive["labels"] = torch.tensor(naive_labels)
    bad_total, bad_count = token_loss(out.logits, naive["labels"])
    n_boundaries = sum(len(p["seq_lengths"]) - 1 for p in packs)
    assert bad_count == ref_count + n_boundaries
    assert abs(bad_total / bad_count - ref_total / ref_count) > 1e-3


def test_a_kv_cache_silently_disables_packed_masking(model, demo_tokenizer, documents):
    """transformers detects packing only when ``past_key_values is None``. With
    ``config.use_cache=True`` (the default of most checkpoints) ``forward`` creates a
    DynamicCache even in train mode, and documents then attend to each other. The training loop
    must call the model with ``use_cache=False`` (the demo config.json sets it too). If this
    test starts failing after a transformers upgrade, that requirement may have been lifted."""
    ids, labels = documents
    packs = pack_sequences(ids, labels, max_length=64)
    batch = SFTCollator(demo_tokenizer.pad_token_id, packed=True)(packs)
    assert model.config.use_cache is True
    model.train()
    try:
        isolated, _ = run(model, batch, use_cache=False)
        cached, _ = run(model, batch, use_cache=None)  # None -> config default (True)
    finally:
        model.eval()
    first = packs[0]["seq_lengths"][0]
    assert_close_f32(cached.logits[0, :first], isolated.logits[0, :first], **rounding())
    assert (cached.logits[0, first:len(packs[0]["input_ids"])]
            - isolated.logits[0, first:len(packs[0]["input_ids"])]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_on_cuda(demo_tokenizer, documents, attn):
    """The same equivalence through the CUDA kernels (fp32, TF32 off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids, labels = documents
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(demo_tokenizer), attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).cuda().eval()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        pad = demo_tokenizer.pad_token_id
        unpacked = SFTCollator(pad, packed=False)([{"input_ids": i, "labels": l} for i, l in zip(ids, labels)])
        packed = SFTCollator(pad, packed=True)(pack_sequences(ids, labels, max_length=64))
        losses = []
        for batch in (unpacked, packed):
            batch = {k: v.cuda() for k, v in batch.items()}
            n = batch.pop("num_label_tokens")
            with torch.no_grad():
                losses.append(model(**batch, num_items_in_batch=n, use_cache=False).loss.item())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    rtol, atol = f32_tol(losses[0], **rounding(config.vocab_size, int(unpacked["num_label_tokens"])))
    assert losses[1] == pytest.approx(losses[0], rel=rtol, abs=atol)
