"""SFT data pipeline: load a table, tokenise and mask it, pack it, collate it.

    table = load_table("train.jsonl")                       # loading.py
    ds, stats = tokenize_sft(table, tokenizer, max_length=2048)   # tokenization.py (+ chat.py)
    packs = pack_sequences(ds["input_ids"], ds["labels"], 2048)   # packing.py
    batch = SFTCollator(tokenizer.pad_token_id, packed=True)(packs[:8])  # collate.py

Vision-language models: ``load_multimodal`` / ``encode_multimodal`` (multimodal.py) turn image-text
rows into samples with image tensors, batched by ``VLMCollator`` (collate.py); tiny_processor.py
builds small real processors offline.

Dataset factories for the registry (``instruction``, ``squad``, ``hellaswag``, ``demo``) live in
sources.py and are registered by ``automodel_cli.plugins.datasets``.

Names are resolved lazily (PEP 562) so that importing this package, e.g. to resolve a registry
entry, does not pull in torch, transformers or datasets until a function is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_table": "loading",
    "SUPPORTED_EXTENSIONS": "loading",
    "tokenize_sft": "tokenization",
    "SFTStats": "tokenization",
    "TruncationWarning": "tokenization",
    "IGNORE_INDEX": "tokenization",
    "pack_sequences": "packing",
    "packing_efficiency": "packing",
    "padding_fraction": "packing",
    "SFTCollator": "collate",
    "VLMCollator": "collate",
    "refuse_packing": "collate",
    "load_multimodal": "multimodal",
    "encode_multimodal": "multimodal",
    "apply_resolution_limits": "multimodal",
    "vlm": "multimodal",
    "instruction": "sources",
    "squad": "sources",
    "hellaswag": "sources",
    "demo": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
