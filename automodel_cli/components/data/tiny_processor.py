"""Build small, real multimodal processors offline (no hub): for tests and the bundled demo.

A vision-language model's "processor" is three parts that ``AutoProcessor.from_pretrained``
reassembles from a directory: a tokenizer that knows the model's image special tokens, the
model's own image-processor class (resizing, patching, normalising), and a chat template that
renders ``content`` lists of text and image parts. Hub processors are large downloads; these
are the same classes with a character-level ``tokenizers`` vocabulary (every printable ASCII
character is one token, so counting and masking are easy to check by eye) and tiny image sizes,
so images of a few dozen pixels become a handful of image tokens.

The directory layout is the one ``ProcessorMixin.save_pretrained`` writes (tokenizer files,
``processor_config.json`` holding the image processor's settings, ``chat_template.jinja``).
It is written from the parts rather than by a processor object because some processor classes
(Qwen2-VL's) also declare a video processor, which transformers can only build when torchvision
is installed; loading such a directory back with ``AutoProcessor`` therefore needs torchvision,
while Gemma 3's needs nothing beyond Pillow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: One token per printable ASCII character, plus newline.
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]

# Templates render string content as is and list content part by part; an image part becomes the
# model's image placeholder, which the processor then expands to one token per image feature.
_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)

QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    + _PARTS.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    + _PARTS.replace("IMAGE", "<start_of_image>")
    + "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                    "<|vision_end|>", "<|video_pad|>"]
GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<image_soft_token>", "<end_of_image>"]


def char_tokenizer(special_tokens: list[str], **named_tokens: Any):
    """A fast tokenizer whose vocabulary is ``special_tokens`` then one token per character.
    ``named_tokens`` are the ``PreTrainedTokenizerFast`` arguments (``eos_token=...``,
    ``extra_special_tokens={...}``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(special_tokens + CHARACTERS)}
    unk = named_tokens.get("unk_token") or special_tokens[0]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named_tokens)


def build_qwen2_vl_processor(out_dir: str | Path, *, min_pixels: int = 28 * 28, max_pixels: int = 56 * 56) -> Path:
    """A Qwen2-VL processor (``Qwen2VLProcessor``, ``Qwen2VLImageProcessor``; patch 14, merge 2):
    with the default limits an image becomes a 2x2 to 4x4 patch grid, i.e. 1 to 4 image tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = char_tokenizer(QWEN2_VL_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return save_processor_parts(out_dir, tokenizer, image_processor, QWEN2_VL_TEMPLATE, "Qwen2VLProcessor")


def build_gemma3_processor(out_dir: str | Path, *, image_size: int = 28, image_seq_length: int = 4) -> Path:
    """A Gemma 3 processor (``Gemma3Processor``, ``Gemma3ImageProcessor``): every image is resized
    to ``image_size`` squared and stands for ``image_seq_length`` image tokens, which must match the
    model's ``mm_tokens_per_image``."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = char_tokenizer(
        GEMMA3_SPECIAL, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return save_processor_parts(out_dir, tokenizer, image_processor, GEMMA3_TEMPLATE, "Gemma3Processor",
                                image_seq_length=image_seq_length)


def save_processor_parts(out_dir: str | Path, tokenizer: Any, image_processor: Any, chat_template: str,
                         processor_class: str, **processor_options: Any) -> Path:
    """Write a processor directory from its parts, as ``ProcessorMixin.save_pretrained`` lays it out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    settings = image_processor.to_dict()
    # The torchvision and Pillow backends share a configuration; name the class AutoImageProcessor
    # maps to the model, so whichever backend is installed loads it.
    settings["image_processor_type"] = settings.get("image_processor_type", "").removesuffix("Pil")
    config = {"image_processor": settings, **processor_options, "processor_class": processor_class}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
    return out
