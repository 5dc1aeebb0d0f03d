"""Built-in datasets for ``data.name``, registered like any third-party plugin's.

Targets are ``"module:function"`` strings resolved on first use, so listing datasets imports
neither ``datasets`` nor torch. Each factory is ``fn(path, split, options) -> datasets.Dataset``
with prompt/completion or messages columns (see automodel_cli/components/data/sources.py).
"""

from __future__ import annotations

from automodel_cli import hookimpl

_SOURCES = "automodel_cli.components.data.sources"

# name -> (function in sources.py, description)
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
}


@hookimpl
def register_datasets(registry):
    for name, (function, description) in DATASETS.items():
        registry.add(name, f"{_SOURCES}:{function}", description=description)
