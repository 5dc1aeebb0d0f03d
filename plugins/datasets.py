"""Built-in datasets for ``data.name``, registered like any third-party plugin's.

Targets are ``"module:function"`` strings resolved on first use, so listing datasets imports
neither ``datasets`` nor torch. Each factory is ``fn(path, split, options) -> datasets.Dataset``
with prompt/completion or messages columns (see automodel_cli/components/data/sources.py), or,
for vision-language models, the normalised image-text table of components/data/multimodal.py, or,
for pre-training, a text column (components/data/text.py; ``options["streaming"]`` asks for a
``datasets.IterableDataset``).
"""

from __future__ import annotations

from automodel_cli import hookimpl

_SOURCES = "automodel_cli.components.data.sources"
_TEXT = "automodel_cli.components.data.text"

# name -> (function in sources.py, or "module:function", description)
DATASETS: dict[str, tuple[str, str]] = {
    "instruction": (
        "instruction",
        "Instruction data from data.path (local jsonl/json/parquet/csv or a hub id) with "
        "prompt/completion or chat messages columns; what data.name=auto uses.",
    ),
    "squad": (
        "squad",
        "SQuAD extractive QA (default hub id rajpurkar/squad, or a local copy in its schema).",
    ),
    "hellaswag": (
        "hellaswag",
        "HellaSwag context -> correct ending (default hub id Rowan/hellaswag, or a local copy).",
    ),
    "demo": (
        "demo",
        "Bundled offline demo: reverse short strings (4000 train / 200 eval samples).",
    ),
    "demo-vlm": (
        "automodel_cli.components.data.shapes:demo_vlm",
        "Bundled offline vision-language demo: name the colour (one of 8) of the shape in a 32 px "
        "image drawn at run time (2000 train / 200 validation images).",
    ),
    "vlm": (
        "automodel_cli.components.data.multimodal:vlm",
        "Image-text data for vision-language models from data.path: chat messages with text/image "
        "parts, image + prompt/completion, or CORD-v2-style image + ground_truth rows (images as "
        "paths relative to the data file, base64, URLs or a datasets Image column).",
    ),
    "text": (
        f"{_TEXT}:text_dataset",
        "Text for pretrain from data.path (.txt documents split at blank lines, or jsonl/json/"
        "parquet/csv or a hub id with a text column); streams with data.streaming.",
    ),
    "demo-text": (
        f"{_TEXT}:demo_text",
        "Bundled offline pre-training corpus (templated stories, counting, sums; 150 KB).",
    ),
}


@hookimpl
def register_datasets(registry):
    for name, (function, description) in DATASETS.items():
        target = function if ":" in function else f"{_SOURCES}:{function}"
        registry.add(name, target, description=description)
