"""The offline processor builder writes directories that load back as the real processor classes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from automodel_cli.components.data.tiny_processor import build_gemma3_processor, build_qwen2_vl_processor


def test_gemma3_directory_loads_with_auto_processor(tmp_path):
    from transformers import AutoProcessor, Gemma3Processor

    processor = AutoProcessor.from_pretrained(build_gemma3_processor(tmp_path, image_size=28, image_seq_length=4))
    assert isinstance(processor, Gemma3Processor)
    assert type(processor.image_processor).__name__.startswith("Gemma3ImageProcessor")
    assert processor.image_seq_length == 4 and processor.image_processor.size.height == 28
    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<image_soft_token>", "<end_of_image>")] \
        == [tokenizer.boi_token_id, tokenizer.image_token_id, tokenizer.eoi_token_id]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<bos><start_of_turn>user\n<start_of_image>hi<end_of_turn>\n<start_of_turn>model\n"


def test_qwen2_vl_directory_has_the_real_classes_and_settings(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    directory = build_qwen2_vl_processor(tmp_path, min_pixels=28 * 28, max_pixels=56 * 56)
    settings = json.loads((directory / "processor_config.json").read_text())
    assert settings["processor_class"] == "Qwen2VLProcessor"
    image_processor = AutoImageProcessor.from_pretrained(directory)
    assert type(image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert (image_processor.patch_size, image_processor.merge_size) == (14, 2)
    assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (28 * 28, 56 * 56)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert all(t in tokenizer.get_vocab() for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers builds Qwen2-VL's processor (it declares a video processor) only with torchvision")
def test_qwen2_vl_directory_loads_with_auto_processor(tmp_path):
    from transformers import AutoProcessor, Qwen2VLProcessor

    assert isinstance(AutoProcessor.from_pretrained(build_qwen2_vl_processor(tmp_path)), Qwen2VLProcessor)
