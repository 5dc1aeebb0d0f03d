"""Regenerate the offline vision-language demo's model directory here (deterministic).

    python automodel_cli/assets/demo_vlm/make_demo_vlm_assets.py [OUT_DIR]

``automodel finetune demo-vlm`` trains a tiny Gemma 3 (SigLIP vision tower, projector, 2-layer
text decoder) from random weights to name the colour of the shape in a small image. Its images are
drawn at run time (components/data/shapes.py); this directory holds only small text files:

- the processor, as ``AutoProcessor.from_pretrained`` reads it (``processor_config.json`` with a
  ``Gemma3ImageProcessor`` that resizes to ``IMAGE_SIZE`` px, ``tokenizer.json`` /
  ``tokenizer_config.json`` with one token per character plus Gemma 3's special tokens,
  ``chat_template.jinja``), built by ``tiny_processor.build_gemma3_processor``;
- ``config.json``: a ``Gemma3Config`` whose vocabulary and special-token ids are the tokenizer's.

Why these sizes: a 32 px image cut into 8 px patches gives the vision tower a 4x4 grid, which
the projector pools to 4 image tokens: small enough to train in about a minute on a CPU.
Both attention layers of the decoder are full (Gemma 3's default pattern makes short stacks all
sliding-window, and the answer must see the image tokens). Weights are never shipped: the recipe
initialises them from ``config.json`` (``model.from_scratch=true``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = 4

TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128,
                   sliding_window=128,
                   layer_types=["full_attention", "full_attention"], use_cache=False)
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)


def write_assets(out: Path) -> None:
    from transformers import AutoTokenizer, Gemma3Config

    from automodel_cli.components.data.tiny_processor import build_gemma3_processor

    build_gemma3_processor(out, image_size=IMAGE_SIZE, image_seq_length=IMAGE_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in ("<bos>", "<eos>", "<pad>", "<image_soft_token>", "<start_of_image>", "<end_of_image>")}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                         pad_token_id=ids["<pad>"], **TEXT_CONFIG),
        vision_config=VISION_CONFIG,
        mm_tokens_per_image=IMAGE_TOKENS, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
    )
    config.save_pretrained(out)
    # transformers 5 writes its own backend class name; name the class every supported release
    # (>= 4.57) resolves, as the text demo's tokenizer does.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_assets(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
