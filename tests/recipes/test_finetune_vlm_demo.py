"""`automodel finetune demo-vlm`: the bundled tiny Gemma 3 learns to name the colour of a drawn
shape, offline, and its final/ is a Hugging Face image-text-to-text model with its processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

QUIET = ["logging.progress=false", "model.dtype=float32"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def greedy_answers(final: Path, n: int) -> tuple[list[str], list[str]]:
    """(generated, reference) answers for the first ``n`` validation samples: the prompt and
    image through the saved processor, greedy decoding until the end of the turn."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from automodel_cli.components.data.shapes import PROMPT, draw_shape, shape_samples

    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    end = processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    generated, reference = [], []
    for colour, shape, box in shape_samples()["validation"][:n]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[draw_shape(colour, shape, box)], add_special_tokens=False,
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=end, use_cache=True)
        generated.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        reference.append(colour)
    return generated, reference


def test_demo_vlm_dataset_is_deterministic_with_disjoint_splits():
    from automodel_cli.components.data.shapes import COLOURS, demo_vlm, shape_samples

    train, validation = demo_vlm(None, "train", {}), demo_vlm(None, "eval", {})
    assert (len(train), len(validation)) == (2000, 200)
    assert train[:5] == demo_vlm(None, "train", {})[:5]  # same PNG bytes on every call
    draws = shape_samples()
    assert not set(draws["train"]) & set(draws["validation"])
    answers = [json.loads(m)[1]["content"][0]["text"] for m in validation["messages"]]
    assert {answers.count(colour) for colour in COLOURS} == {200 // len(COLOURS)}
    assert demo_vlm(None, "validation[10:13]", {})[:] == validation[10:13]


@pytest.mark.parametrize("split", ["dev", "train[:x]", "train[1:2:3]"])
def test_demo_vlm_dataset_names_its_splits_when_given_another(split):
    from automodel_cli.components.data.shapes import demo_vlm
    from automodel_cli.errors import UserError

    with pytest.raises(UserError, match="no split") as error:
        demo_vlm(None, split, {})
    assert "data.split=train" in error.value.hint


def test_short_demo_vlm_run_writes_model_and_processor(cli, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "run"
    result = cli("finetune", "demo-vlm", "-o", str(run), "train.max_steps=3", "data.split=train[:96]",
                 "data.eval_split=validation[:16]", "train.eval_every_steps=null", *QUIET)
    assert result.exit_code == 0, result.stderr
    assert "before training:" in result.stdout and "after training:" in result.stdout
    final = run / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(final)
    assert processor.image_token == "<start_of_image>"
    # The saved processor and model fit together: an image becomes the model's image tokens.
    generated, _ = greedy_answers(final, 1)
    assert isinstance(generated[0], str)


@pytest.mark.slow
def test_full_demo_vlm_learns_and_generated_answers_match(cli, tmp_path):
    """The default demo: exact match from about 0 to nearly all; greedy generation with the saved
    model and processor reproduces the answers the teacher-forced metric counted as exact."""
    run = tmp_path / "run"
    result = cli("finetune", "demo-vlm", "-o", str(run), *QUIET)
    assert result.exit_code == 0, result.stderr
    before, after = summary(run)["before"], summary(run)["after"]
    assert before["eval_exact_match"] <= 0.1
    assert after["eval_exact_match"] >= 0.9
    generated, reference = greedy_answers(run / "final", 40)
    hits = sum(g == r for g, r in zip(generated, reference))
    assert hits >= 36, list(zip(generated, reference))
