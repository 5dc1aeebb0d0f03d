"""tokenize_sft: exact masking for prompt/completion and multi-turn chat, errors, stats."""

from __future__ import annotations

import copy
import warnings

import pytest
from datasets import Dataset

from data_fixtures import demo_tokenizer, jsonl, word_tokenizer  # noqa: F401  (fixtures)
from automodel_cli.components.data import IGNORE_INDEX, TruncationWarning, tokenize_sft
from automodel_cli.errors import UserError

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def build(tok, segments):
    """Expected (ids, labels) from (text, trained) segments, labels[0] always masked."""
    ids, labels = [], []
    for text, trained in segments:
        piece = enc(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    labels[0] = IGNORE_INDEX
    return ids, labels


# ------------------------------------------------------------------ prompt / completion


def test_prompt_completion_masks_prompt_and_trains_completion_plus_eos(demo_tokenizer):
    tok = demo_tokenizer
    ds = Dataset.from_list([{"prompt": "reverse: abc\n", "completion": "cba"},
                            {"prompt": "reverse: hij\n", "completion": "jih"}])
    out, stats = tokenize_sft(ds, tok, max_length=64)
    assert out.column_names == ["input_ids", "labels"]
    prompt, completion = enc(tok, "reverse: abc\n"), enc(tok, "cba")
    assert out[0]["input_ids"] == [tok.bos_token_id] + prompt + completion + [tok.eos_token_id]
    assert out[0]["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + completion + [tok.eos_token_id]
    assert stats.n_samples == 2 and stats.n_truncated == 0 and stats.n_dropped == 0
    assert stats.n_tokens == 2 * (1 + 13 + 3 + 1)
    assert stats.n_trainable_tokens == 2 * (3 + 1)


def test_bos_is_not_doubled(demo_tokenizer):
    tok = demo_tokenizer
    out, _ = tokenize_sft(Dataset.from_list([{"prompt": "<s>ab", "completion": "c</s>"}]), tok, max_length=64)
    assert out[0]["input_ids"] == [tok.bos_token_id] + enc(tok, "ab") + enc(tok, "c") + [tok.eos_token_id]


def test_tokenizer_without_bos_gets_none_and_first_label_is_masked(word_tokenizer):
    tok = word_tokenizer
    ds = Dataset.from_list([{"prompt": "", "completion": "paris"}, {"prompt": "what is", "completion": "paris"}])
    out, stats = tokenize_sft(ds, tok, max_length=16)
    paris, eos = enc(tok, "paris"), tok.eos_token_id
    assert out[0]["input_ids"] == paris + [eos]
    assert out[0]["labels"] == [IGNORE_INDEX, eos]  # nothing can predict the very first token
    assert out[1]["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + paris + [eos]
    assert stats.n_trainable_tokens == 1 + 2


def test_custom_column_names_and_extra_columns_dropped(word_tokenizer):
    ds = Dataset.from_list([{"question": "what is", "answer": "paris", "id": 3}])
    out, _ = tokenize_sft(ds, word_tokenizer, prompt_column="question", completion_column="answer", max_length=16)
    assert out.column_names == ["input_ids", "labels"]
    assert out[0]["labels"][-2:] == enc(word_tokenizer, "paris") + [word_tokenizer.eos_token_id]


@pytest.mark.parametrize("columns, missing", [
    (["question", "answer"], "lacks the `prompt` and `completion` columns"),
    (["prompt", "answer"], "lacks the `completion` column "),
])
def test_missing_columns_message_lists_available_columns(word_tokenizer, columns, missing):
    ds = Dataset.from_list([{c: "hi" for c in columns}])
    with pytest.raises(UserError) as info:
        tokenize_sft(ds, word_tokenizer, max_length=16)
    assert missing in info.value.message
    assert f"Available columns: {columns}" in info.value.message
    assert "no `messages` column" in info.value.message
    assert "data.prompt_column=" in info.value.hint and "data.completion_column=" in info.value.hint
    assert info.value.exit_code == 2


def test_non_text_cell_names_the_row(jsonl, word_tokenizer):
    from automodel_cli.components.data import load_table

    path = jsonl("t.jsonl", [{"prompt": "hi", "completion": "b"}, {"prompt": {"x": 1}, "completion": "c"}])
    with pytest.raises(UserError, match=r"Row 1: column `prompt` holds dict"):
        tokenize_sft(load_table(str(path)), word_tokenizer, max_length=16)


# ----------------------------------------------------------------------------- chat


def test_chat_generation_marker_route_trains_exactly_assistant_turns(demo_tokenizer):
    tok = demo_tokenizer
    assert "{% generation %}" in tok.chat_template
    out, stats = tokenize_sft(Dataset.from_list([{"messages": CHAT}]), tok, max_length=128)
    expected_ids, expected_labels = build(tok, [
        ("<s><|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n", False),
        ("hello<|end|>", True),
        ("\n<|user|>\nhow are you<|end|>\n<|assistant|>\n", False),
        ("fine thanks<|end|>", True),
        ("\n", False),
    ])
    assert out[0]["input_ids"] == expected_ids
    assert enc(tok, tok.apply_chat_template(CHAT, tokenize=False)) == expected_ids
    assert out[0]["labels"] == expected_labels
    trained = [t for t in out[0]["labels"] if t != IGNORE_INDEX]
    assert trained == enc(tok, "hello<|end|>") + enc(tok, "fine thanks<|end|>")
    assert stats.n_trainable_tokens == len(trained)


def test_chat_prefix_route_without_generation_markers(demo_tokenizer):
    tok = demo_tokenizer
    template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    out, _ = tokenize_sft(Dataset.from_list([{"messages": CHAT}]), tok, max_length=128, chat_template=template)
    _, expected_labels = build(tok, [
        ("<s><|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n", False),
        ("hello<|end|>\n", True),  # the prefix route trains the whole turn, separator included
        ("<|user|>\nhow are you<|end|>\n<|assistant|>\n", False),
        ("fine thanks<|end|>\n", True),
    ])
    assert out[0]["labels"] == expected_labels


def test_chat_word_tokenizer_multi_turn_exact_ids(word_tokenizer):
    tok = word_tokenizer
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    out, stats = tokenize_sft(Dataset.from_list(rows), tok, max_length=64)
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    assert ids == enc(tok, "[system] be brief [end] [user] hi [end] [assistant] hello [end] "
                           "[user] how are you [end] [assistant] fine thanks [end]")
    assert [t for t in labels if t != IGNORE_INDEX] == enc(tok, "hello [end] fine thanks [end]")
    # the masked positions are exactly the non-assistant ones
    trained_positions = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert trained_positions == [8, 9, 16, 17, 18]
    assert out[1]["labels"] == [IGNORE_INDEX] * 4 + enc(tok, "hello [end]")
    assert stats.n_trainable_tokens == 5 + 2


def test_chat_row_without_assistant_is_dropped(word_tokenizer):
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[:2]}]
    out, stats = tokenize_sft(Dataset.from_list(rows), word_tokenizer, max_length=64)
    assert (stats.n_samples, stats.n_dropped, len(out)) == (2, 1, 1)


def test_chat_template_that_rewrites_earlier_turns_trains_assistant_contents(word_tokenizer):
    """Not prefix-stable (the end marker follows only the last message), like templates that
    drop reasoning from past answers: assistant contents are located verbatim instead."""
    unstable = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} "
        "{% if loop.last %}[end] {% endif %}{% endfor %}"
    )
    out, _ = tokenize_sft(Dataset.from_list([{"messages": CHAT}]), word_tokenizer, max_length=64,
                          chat_template=unstable)
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    assert ids == enc(word_tokenizer, "[system] be brief [user] hi [assistant] hello [user] how are you "
                                      "[assistant] fine thanks [end]")
    trained = [t for t in labels if t != IGNORE_INDEX]
    # the EOS of this tokenizer is </s>, which the template never writes: contents only
    assert trained == enc(word_tokenizer, "hello") + enc(word_tokenizer, "fine thanks")


def test_content_route_trains_the_eos_that_ends_an_assistant_turn(demo_tokenizer):
    eos = demo_tokenizer.eos_token
    unstable = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}" + eos + "{% endif %}"
        "{% if loop.last %}!{% endif %}\n{% endfor %}"
    )
    chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "de"}, {"role": "assistant", "content": "ed"}]
    out, _ = tokenize_sft(Dataset.from_list([{"messages": chat}]), demo_tokenizer, max_length=128,
                          chat_template=unstable)
    trained = [t for t in out[0]["labels"] if t != IGNORE_INDEX]
    eos_id = demo_tokenizer.eos_token_id
    assert trained == enc(demo_tokenizer, "cba") + [eos_id] + enc(demo_tokenizer, "ed") + [eos_id]


def test_chat_template_that_changes_contents_is_a_user_error(word_tokenizer):
    changing = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] if loop.last else 'elided' }} "
        "{% if loop.last %}[end] {% endif %}{% endfor %}"
    )
    with pytest.raises(UserError, match=r"row 0: the chat template does not render conversations prefix-stably") as info:
        tokenize_sft(Dataset.from_list([{"messages": CHAT}]), word_tokenizer, max_length=64, chat_template=changing)
    assert "{% generation %}" in info.value.hint


def test_chat_without_template_is_a_user_error(word_tokenizer):
    tok = copy.deepcopy(word_tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template") as info:
        tokenize_sft(Dataset.from_list([{"messages": CHAT}]), tok, max_length=64)
    assert "model.chat_template" in info.value.hint


def test_malformed_messages_name_the_row(word_tokenizer):
    rows = [{"messages": CHAT[1:3]}, {"messages": [{"role": "user", "text": "hi"}]}]
    with pytest.raises(UserError, match=r"Chat data row 1, message 0: expected an object with `role` and `content`"):
        tokenize_sft(Dataset.from_list(rows), word_tokenizer, max_length=64)


def test_messages_column_name_is_configurable(word_tokenizer):
    ds = Dataset.from_list([{"conversation": CHAT[1:3]}])
    out, _ = tokenize_sft(ds, word_tokenizer, messages_column="conversation", max_length=64)
    assert [t for t in out[0]["labels"] if t != IGNORE_INDEX] == enc(word_tokenizer, "hello [end]")


# ------------------------------------------------------------------- truncation / stats


def test_everything_masked_after_truncation_is_a_user_error(demo_tokenizer):
    ds = Dataset.from_list([{"prompt": "reverse: " + "abcdefghij" * 3, "completion": "x"}] * 3)
    with pytest.raises(UserError) as info:
        tokenize_sft(ds, demo_tokenizer, max_length=10)
    assert "No trainable tokens" in info.value.message
    assert "3 of them are longer than data.max_length=10" in info.value.message
    assert "Raise data.max_length" in info.value.hint


def _rows(n_long: int, n: int = 10):
    return [{"prompt": "reverse: ab\n", "completion": "abcdefghij" * (3 if i < n_long else 0) + "ba"}
            for i in range(n)]


def test_truncation_warning_reports_counts(demo_tokenizer):
    with pytest.warns(TruncationWarning, match=r"3 of 10 samples \(30\.0%\) are longer than data\.max_length=20"):
        out, stats = tokenize_sft(Dataset.from_list(_rows(3)), demo_tokenizer, max_length=20)
    assert stats.n_truncated == 3 and stats.longest == 1 + 12 + 32 + 1
    assert all(len(ids) <= 20 for ids in out["input_ids"])
    assert [len(ids) for ids in out["input_ids"]][:4] == [20, 20, 20, 1 + 12 + 2 + 1]
    assert stats.n_tokens == 3 * 20 + 7 * 16
    assert stats.n_trainable_tokens == 3 * (20 - 13) + 7 * 3


def test_no_warning_at_ten_percent(demo_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = tokenize_sft(Dataset.from_list(_rows(1)), demo_tokenizer, max_length=20)
    assert stats.n_truncated == 1


def test_bad_max_length(demo_tokenizer):
    with pytest.raises(UserError, match="data.max_length must be an integer >= 2"):
        tokenize_sft(Dataset.from_list(_rows(0)), demo_tokenizer, max_length=1)


def test_tokenization_is_deterministic(demo_tokenizer):
    ds = Dataset.from_list(_rows(1))
    first, s1 = tokenize_sft(ds, demo_tokenizer, max_length=20)
    second, s2 = tokenize_sft(ds, demo_tokenizer, max_length=20)
    assert first[:] == second[:] and s1 == s2


def test_list_content_with_a_string_only_template_is_a_user_error(word_tokenizer):
    """The word tokenizer's template concatenates strings: Jinja raises a TypeError on a content
    that is a list of parts, which becomes an error naming the row and the fix."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "fine"}]}]}]
    with pytest.raises(UserError, match=r"Chat data row 0: the chat template cannot render message contents that are lists") as info:
        tokenize_sft(Dataset.from_list(rows), word_tokenizer, max_length=64)
    assert "plain string" in info.value.hint


def test_image_parts_for_a_text_only_model_are_a_user_error(word_tokenizer):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "fine"}]}]}]
    with pytest.raises(UserError, match=r"Chat data row 0 contains images, but the model is text-only"):
        tokenize_sft(Dataset.from_list(rows), word_tokenizer, max_length=64)
