"""The pieces of generated-answer evaluation: which tokens are the prompt and which the reference,
left padding, stopping, and the two scores."""

from __future__ import annotations

from transformers import AutoTokenizer

from automodel_cli.assets import demo_dir
from automodel_cli.components.training.generation import (
    IGNORE_INDEX,
    GenerationResult,
    answer_samples,
    last_trained_span,
    left_pad,
    until_stop,
)

M = IGNORE_INDEX


def test_the_reference_is_the_last_trained_span():
    assert last_trained_span([M, M, 5, 6, M, M, 7, 8, 9]) == (6, 9)
    assert last_trained_span([M, 5, 6, M, M]) == (1, 3)
    assert last_trained_span([M, M]) is None


def test_a_chat_prompt_is_the_conversation_before_its_last_answer():
    from automodel_cli.components.data.chat import ChatEncoder, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(demo_dir())
    encoder = ChatEncoder(tokenizer, resolve_template(tokenizer, None), IGNORE_INDEX)
    messages = [{"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"},
                {"role": "user", "content": "reverse: xyz"}, {"role": "assistant", "content": "zyx"}]
    ids, labels = encoder.encode(messages, 0)
    [sample] = answer_samples([{"input_ids": ids, "labels": labels}], tokenizer)
    assert sample.reference == "zyx"
    prompt = tokenizer.decode(sample.prompt_ids)
    # the whole conversation up to the last assistant header, the first answer included
    assert prompt.endswith("<|assistant|>\n") and "ba<|end|>" in prompt and "zyx" not in prompt


def test_samples_without_a_prompt_are_left_out():
    tokenizer = AutoTokenizer.from_pretrained(demo_dir())
    assert answer_samples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], tokenizer) == []


def test_left_padding_right_aligns_every_prompt():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_an_answer_ends_at_the_first_stop_token():
    assert until_stop([4, 5, 2, 6, 2], stops=[2]) == [4, 5]
    assert until_stop([4, 5], stops=[2]) == [4, 5]


def test_exact_match_and_contains():
    result = GenerationResult(references=["ba", "cba", "x"], answers=["ba", "cba and more", "y"])
    assert result.exact_match == 1 / 3 and result.contains == 2 / 3
    assert result.metrics() == {"eval_generate_exact_match": 1 / 3, "eval_generate_contains": 2 / 3,
                                "eval_generate_samples": 3}
