"""A tiny, randomly initialised Gemma 3 vision-language model directory, built offline.

Tests and benchmarks need a VLM directory that ``automodel finetune model.path=DIR`` and
``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(DIR)`` load like a hub
download, without the hub. The processor is the offline one of ``tiny_processor`` (character
tokenizer, Gemma 3 image processor, a chat template that renders image parts); the model's
config takes its special token ids (image soft token, begin/end of image, pad, BOS, EOS) and
vocabulary size from that tokenizer, so the processor's image tokens are the ones the model
replaces with image features. Gemma 3 is used because its processor needs only Pillow
(Qwen2-VL's also needs torchvision for its video half).
"""

from __future__ import annotations

from pathlib import Path


def build_gemma3_vlm(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
                     image_size: int = 28, tokens_per_image: int = 4, seed: int = 0) -> Path:
    """Write processor files and a float32 ``Gemma3ForConditionalGeneration`` (``save_pretrained``)
    into ``out_dir``: a text decoder of ``num_layers`` layers of width ``hidden_size`` (heads of
    16) and a 2-layer SigLIP tower that sees ``image_size``-pixel images (patch 14) as
    ``tokens_per_image`` image tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma3Config

    from automodel_cli.components.data.tiny_processor import build_gemma3_processor

    out = build_gemma3_processor(out_dir, image_size=image_size, image_seq_length=tokens_per_image)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image", "<image_soft_token>"), ("boi", "<start_of_image>"), ("eoi", "<end_of_image>"))}
    heads = max(1, hidden_size // 16)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3 // 2,
                         num_hidden_layers=num_layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), head_dim=16, sliding_window=8,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14),
        mm_tokens_per_image=tokens_per_image, image_token_index=ids["image"], boi_token_index=ids["boi"],
        eoi_token_index=ids["eoi"])
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).to(torch.float32).save_pretrained(out)
    return out
