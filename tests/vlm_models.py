"""Tiny vision-language models for tests, built from configs (no hub): a Qwen2-VL (text hidden 64,
2 layers; vision depth 2, embed_dim 32, patch 14, merge 2) and a Gemma 3 with a tiny SigLIP
vision tower (image 28 px, patch 14, 4 image tokens), saved with ``save_pretrained``, and inputs
with pixel values that reach the vision tower (image tokens where the model expects them); and
for whole runs, a Gemma 3 directory with its offline processor (``gemma3_model_dir``) and
image-text chat data beside its images (``write_colour_chat``)."""

from __future__ import annotations

from pathlib import Path

import torch

#: Token ids of the tiny models' special image tokens (inside the 128-token vocabulary).
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def qwen2_vl_config() -> object:
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False)


def gemma3_config() -> object:
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=dict(**TEXT, head_dim=16, sliding_window=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START,
        eoi_token_index=VISION_END)


CONFIGS = {"qwen2_vl": qwen2_vl_config, "gemma3": gemma3_config}


def make_vlm(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny VLM (``AutoModelForImageTextToText``), float32."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(CONFIGS[arch]())


def save_vlm(directory: Path, arch: str, seed: int = 0) -> Path:
    """``make_vlm`` written with ``save_pretrained`` (the checkpoint format, not module names)."""
    make_vlm(arch, seed).save_pretrained(directory)
    return directory


def vlm_inputs(arch: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for ``batch`` samples of one image each, as the model's processor lays them
    out: Qwen2-VL: a 56x56 image as 16 flattened patches (4 image tokens after the 2x2 merge)
    with ``image_grid_thw`` and ``mm_token_type_ids``; Gemma 3: (batch, 3, 28, 28) pixels (4 image tokens each) with
    ``token_type_ids`` marking the image tokens. Text tokens are random, in the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 100, (batch, 6), generator=generator)
    image = torch.full((batch, 4), IMAGE_TOKEN)
    ids = torch.cat([text[:, :2], torch.full((batch, 1), VISION_START), image, torch.full((batch, 1), VISION_END),
                     text[:, 2:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "qwen2_vl":
        patch_dim = 3 * 2 * 14 * 14
        inputs["pixel_values"] = torch.randn(batch * 16, patch_dim, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()  # 1 on image tokens: M-RoPE positions
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=generator)
        inputs["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return inputs


def vlm_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


# ------------------------------------------------------------------ a whole run's inputs
#: Colour names the image-text data asks for, with the colour of the image that shows each.
COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def gemma3_model_dir(directory: Path, seed: int = 0) -> Path:
    """A tiny Gemma 3 VLM directory (processor files + weights) that ``automodel finetune
    model.path=DIR`` fine-tunes: ``tiny_vlm.build_gemma3_vlm`` at its test sizes (text hidden 64,
    2 layers, 28-pixel images as 4 image tokens)."""
    from automodel_cli.components.models.tiny_vlm import build_gemma3_vlm

    return build_gemma3_vlm(directory, seed=seed)


def colour_answer(index: int) -> str:
    """The assistant text of row ``index``: a colour name, longer on every other row, so rows
    train different numbers of tokens."""
    name = list(COLOURS)[index % len(COLOURS)]
    return name if index % 2 == 0 else f"it is {name}"


def write_colour_chat(directory: Path, count: int = 8) -> Path:
    """``train.jsonl`` of ``count`` chat rows beside their PNG images (paths relative to the data
    file): the user shows a single-colour image of a few dozen pixels and asks for its colour, the
    assistant answers ``colour_answer(row)``."""
    import json

    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        name = list(COLOURS)[index % len(COLOURS)]
        Image.new("RGB", (30 + index, 24 + 2 * index), COLOURS[name]).save(directory / f"image{index}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"image{index}.png"},
                                         {"type": "text", "text": "colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": colour_answer(index)}]}]})
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
