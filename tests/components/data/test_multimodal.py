"""Image-text data: schemas, image sources, processor-based encoding and the loss mask, with
tiny real Qwen2-VL and Gemma 3 processors built offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from automodel_cli.components.data.multimodal import (
    CORD_PROMPT, apply_resolution_limits, encode_multimodal, json_to_tokens, load_image, load_multimodal,
)
from automodel_cli.errors import UserError

from data_fixtures import word_tokenizer, write_jsonl  # noqa: F401  (fixtures)
from vlm_fixtures import gemma3_processor, load_processor, qwen2_vl_processor, save_image, vlm_processor  # noqa: F401

IGNORE = -100


def _encode(rows, tmp_path: Path, processor, max_length=512, name="train.jsonl"):
    table = load_multimodal(str(write_jsonl(tmp_path / name, rows)), "train", {})
    return encode_multimodal(table, processor, max_length=max_length)


def _trained_text(processor, sample) -> str:
    return processor.tokenizer.decode([t for t in sample["labels"] if t != IGNORE])


def _end_of_turn(processor) -> str:
    return "<|im_end|>\n" if "<|im_end|>" in processor.tokenizer.get_vocab() else "<end_of_turn>\n"


def _chat(image_ref, question, answer):
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


# ------------------------------------------------------------------------------- the loss mask


def test_trained_tokens_are_exactly_the_assistant_tokens(vlm_processor, tmp_path):
    """Position by position: labels equal input_ids on the assistant turns' tokens (answer and
    end-of-turn marker) and are -100 everywhere else: prompt, image and vision tokens."""
    save_image(tmp_path / "img" / "red.png")
    save_image(tmp_path / "img" / "tall.png", size=(20, 60), colour=(0, 0, 255))
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": "img/red.png"},
                                     {"type": "image", "path": "img/tall.png"}, {"type": "text", "text": "colours?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red, blue"}]},
        {"role": "user", "content": "sure?"},
        {"role": "assistant", "content": "yes"},
    ]}]
    (sample,), stats = _encode(rows, tmp_path, vlm_processor)
    tokenizer = vlm_processor.tokenizer
    ids, labels = sample["input_ids"], sample["labels"]
    eot = _end_of_turn(vlm_processor)
    # The character tokenizer makes one token per character, so the expected trained positions
    # are where the assistant texts sit in the decoded sequence.
    pieces = [tokenizer.decode([t]) for t in ids]
    text = "".join(pieces)
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    expected = set()
    for answer in ("red, blue", "yes"):
        begin = text.index("\n" + answer + eot) + 1
        expected |= {i for i, s in enumerate(starts) if begin <= s < begin + len(answer + eot)}
    trained = {i for i, label in enumerate(labels) if label != IGNORE}
    assert trained == expected
    assert all(labels[i] == ids[i] for i in trained)
    assert _trained_text(vlm_processor, sample) == f"red, blue{eot}yes{eot}"
    assert stats.n_trainable_tokens == len(expected)
    image_token_id = tokenizer.convert_tokens_to_ids(vlm_processor.image_token)
    assert ids.count(image_token_id) >= 2  # the placeholders were expanded, and stay masked


def test_qwen2_vl_image_tokens_match_the_patch_grid(qwen2_vl_processor, tmp_path):
    save_image(tmp_path / "a.png", size=(40, 30))
    save_image(tmp_path / "b.png", size=(20, 60))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "image", "image": "b.png"}]},
                          {"role": "assistant", "content": "ab"}]}]
    (sample,), _ = _encode(rows, tmp_path, qwen2_vl_processor)
    grid = sample["image_grid_thw"]
    assert grid.shape == (2, 3)
    assert sample["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    pad = qwen2_vl_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sample["input_ids"].count(pad) == int(grid.prod(dim=1).sum()) // 4  # merge 2 x 2
    assert len(sample["mm_token_type_ids"]) == len(sample["input_ids"])


def test_gemma3_marks_image_tokens_with_token_type_ids(gemma3_processor, tmp_path):
    save_image(tmp_path / "a.png")
    (sample,), _ = _encode([_chat("a.png", "q", "a")], tmp_path, gemma3_processor)
    soft = gemma3_processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert [int(t == soft) for t in sample["input_ids"]] == sample["token_type_ids"]
    assert tuple(sample["pixel_values"].shape) == (1, 3, 28, 28)


# ------------------------------------------------------------------------------------ schemas


def test_schemas_and_text_only_rows_mix_in_one_file(vlm_processor, tmp_path):
    save_image(tmp_path / "pics" / "r.png")
    data_dir = tmp_path / "data"
    ground_truth = json.dumps({"gt_parse": {"total": {"price": "5"}, "menu": [{"nm": "tea"}, {"nm": "pie"}]}})
    rows = [
        _chat("../pics/r.png", "colour?", "red"),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"image": "../pics/r.png", "prompt": "what?", "completion": "a square"},
        {"image": "../pics/r.png", "ground_truth": ground_truth},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and?"}]},
                      {"role": "assistant", "content": "ok"}], "images": ["../pics/r.png"]},
    ]
    data_dir.mkdir()
    samples, stats = _encode(rows, data_dir, vlm_processor)
    eot = _end_of_turn(vlm_processor)
    assert [_trained_text(vlm_processor, s) for s in samples] == [
        f"red{eot}", f"yo{eot}", f"a square{eot}",
        f"<s_menu><s_nm>tea</s_nm><sep/><s_nm>pie</s_nm></s_menu><s_total><s_price>5</s_price></s_total>{eot}",
        f"ok{eot}",
    ]
    assert [("pixel_values" in s) for s in samples] == [True, False, True, True, True]
    assert CORD_PROMPT in vlm_processor.tokenizer.decode(samples[3]["input_ids"])
    assert stats.n_samples == 5 and stats.n_dropped == 0


def test_json_to_tokens_sorts_keys_and_joins_lists():
    assert json_to_tokens({"b": ["x", {"c": 1}], "a": "y"}) == "<s_a>y</s_a><s_b>x<sep/><s_c>1</s_c></s_b>"


def test_images_as_base64_data_url_pil_and_datasets_image_column(gemma3_processor, tmp_path):
    """The same picture given four ways encodes to the same pixels."""
    import datasets
    from PIL import Image

    path = save_image(tmp_path / "a.png", size=(30, 30), colour=(10, 200, 30))
    raw = base64.b64encode(path.read_bytes()).decode()
    table = load_multimodal(str(write_jsonl(tmp_path / "t.jsonl", [
        _chat("a.png", "q", "a"), _chat(raw, "q", "a"), _chat("data:image/png;base64," + raw, "q", "a"),
    ])), "train", {})
    parquet = tmp_path / "p" / "train.parquet"
    parquet.parent.mkdir()
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "completion": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [Image.open(path)], "prompt": ["q"], "completion": ["a"]},
                               features=features).to_parquet(parquet)
    from_parquet = load_multimodal(str(parquet), "train", {})
    samples, _ = encode_multimodal(table, gemma3_processor, max_length=256)
    (parquet_sample,), _ = encode_multimodal(from_parquet, gemma3_processor, max_length=256)
    for other in [*samples[1:], parquet_sample]:
        assert (other["pixel_values"] == samples[0]["pixel_values"]).all()


def test_resolution_limits_change_the_number_of_image_tokens(tmp_path):
    from automodel_cli.components.data.tiny_processor import build_qwen2_vl_processor

    save_image(tmp_path / "a.png", size=(56, 56))
    counts = []
    for max_pixels in (28 * 28, 56 * 56):
        processor = load_processor(build_qwen2_vl_processor(tmp_path / f"p{max_pixels}"))
        apply_resolution_limits(processor, None, max_pixels)
        (sample,), _ = _encode([_chat("a.png", "q", "a")], tmp_path, processor)
        counts.append(sample["input_ids"].count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    assert counts == [1, 4]


def test_resolution_limits_are_refused_for_fixed_size_processors(gemma3_processor):
    with pytest.raises(UserError, match="dynamic resolution"):
        apply_resolution_limits(gemma3_processor, 100, None)


def test_truncation_never_cuts_image_tokens(qwen2_vl_processor, tmp_path):
    save_image(tmp_path / "a.png")
    long_prompt = "x" * 40
    rows = [_chat("a.png", "q", "a" * 30),  # image early: truncated, kept
            {"messages": [{"role": "user", "content": [{"type": "text", "text": long_prompt},
                                                        {"type": "image", "image": "a.png"}]},
                          {"role": "assistant", "content": "b"}]}]  # image beyond the cut: dropped
    with pytest.warns(UserWarning, match="image tokens"):
        samples, stats = _encode(rows, tmp_path, qwen2_vl_processor, max_length=45)
    assert len(samples) == 1 and stats.n_truncated == 2 and stats.n_dropped == 1
    assert len(samples[0]["input_ids"]) == len(samples[0]["labels"]) == len(samples[0]["mm_token_type_ids"]) == 45


# ---------------------------------------------------------------------------------- bad input


def test_missing_image_file_names_file_and_row(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [_chat("missing.png", "q", "a")] * 2)
    save_image(tmp_path / "missing.png")
    (tmp_path / "other").mkdir()
    bad = write_jsonl(tmp_path / "other" / "train.jsonl", [_chat("../missing.png", "q", "a"), _chat("nope.png", "q", "a")])
    load_multimodal(str(data), "train", {})  # present: fine
    with pytest.raises(UserError) as info:
        load_multimodal(str(bad), "train", {})
    assert f"`{bad}` row 2" in info.value.message and "nope.png" in info.value.message


def test_non_image_file_is_refused_with_its_row(gemma3_processor, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(UserError) as info:
        _encode([_chat("notes.png", "q", "a")], tmp_path, gemma3_processor)
    assert "row 1" in info.value.message and "cannot be read as an image" in info.value.message


def test_base64_that_is_not_an_image_is_refused(gemma3_processor, tmp_path):
    not_an_image = base64.b64encode(b"plain text, not a picture " * 4).decode()
    with pytest.raises(UserError, match="the base64 image cannot be read as an image"):
        _encode([_chat(not_an_image, "q", "a")], tmp_path, gemma3_processor)


def test_images_for_a_text_only_tokenizer_are_refused(word_tokenizer, tmp_path):
    save_image(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            _chat("a.png", "q", "a")]
    with pytest.raises(UserError) as info:
        _encode(rows, tmp_path, word_tokenizer)
    assert "text-only" in info.value.message and "row 2" in info.value.message


def test_image_count_must_match_the_image_tokens(vlm_processor, tmp_path):
    save_image(tmp_path / "a.png")
    token = vlm_processor.image_token
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": f"see {token}"}]},
                          {"role": "assistant", "content": "a"}]}]
    with pytest.raises(UserError) as info:
        _encode(rows, tmp_path, vlm_processor)
    assert "row 1" in info.value.message and "1 image(s)" in info.value.message and "2 image placeholder" in info.value.message


def test_more_bare_image_parts_than_images(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}]}]
    with pytest.raises(UserError, match="more image parts than images"):
        load_multimodal(str(write_jsonl(tmp_path / "t.jsonl", rows)), "train", {})


def test_unknown_schema_lists_the_accepted_ones(tmp_path):
    with pytest.raises(UserError, match="none of the image-text schemas"):
        load_multimodal(str(write_jsonl(tmp_path / "t.jsonl", [{"question": "q"}])), "train", {})


def test_all_masked_is_refused(gemma3_processor, tmp_path):
    save_image(tmp_path / "a.png")
    with pytest.raises(UserError, match="No trainable tokens"):
        _encode([_chat("a.png", "a long question " * 3, "a")], tmp_path, gemma3_processor, max_length=20)


def test_load_image_accepts_pil(tmp_path):
    from PIL import Image

    image = load_image(Image.new("L", (5, 5)), "row 1")
    assert image.mode == "RGB" and image.size == (5, 5)


def test_vlm_dataset_entry_resolves_to_the_loader(tmp_path):
    import automodel_cli.plugins.datasets as plugin
    from automodel_cli.components.data.multimodal import vlm
    from automodel_cli.registry import DatasetRegistry

    registry = DatasetRegistry()
    plugin.register_datasets(registry)
    assert registry.get("vlm").load() is vlm
    table = vlm(str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "a"}])), "train", {})
    assert table.column_names == ["messages", "images", "source"] and table["images"] == [[]]


# ------------------------------------------------------------------ from config to batches


def _prepare(tmp_path, processor, *overrides):
    from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve
    from automodel_cli.plugin_host import get_registries
    from automodel_cli.training.sft_data import prepare_vlm_data

    cfg = resolve([defaults_layer(), layer_from_overrides(list(overrides))])
    said: list[str] = []
    return prepare_vlm_data(cfg, processor, get_registries(), said.append), said


def test_prepare_vlm_data_reads_encodes_and_batches(qwen2_vl_processor, tmp_path):
    """data.name=auto means the image-text loader here; the eval split is held out; batches carry
    the images of their samples; the stats line is said."""
    import copy

    save_image(tmp_path / "a.png")
    rows = [_chat("a.png", f"q{i}", "red") for i in range(4)] + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    processor = copy.deepcopy(qwen2_vl_processor)
    data, said = _prepare(tmp_path, processor, f"data.path={path}", "data.eval_size=1", "data.max_pixels=784")
    assert len(data.train) == 4 and len(data.eval) == 1
    assert processor.image_processor.size.longest_edge == 784  # data.max_pixels reached the processor
    assert any(line.startswith("train data: 4 samples") for line in said)
    batch = data.collate(data.train[:2])
    n_images = sum("pixel_values" in s for s in data.train[:2])
    assert batch["image_grid_thw"].shape[0] == n_images
    assert data.train_label_tokens == [sum(t != IGNORE for t in s["labels"][1:]) for s in data.train]


def test_prepare_vlm_data_refuses_packing_images(gemma3_processor, tmp_path):
    save_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "train.jsonl", [_chat("a.png", "q", "a")])
    with pytest.raises(UserError, match="cannot pack image-text samples"):
        _prepare(tmp_path, gemma3_processor, f"data.path={path}", "data.packing=true")
