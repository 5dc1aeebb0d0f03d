"""The bundled offline classification demo (``data.name=demo-classify``): strings of the demo
alphabet (letters a-j) labelled by the group of their first letter, ``a-c``, ``d-g`` or ``h-j``.

The head reads the last token, so it has to learn to look back to the first letter: a property
a random tiny model cannot guess (a third of the answers right) and learns in a few hundred
steps. Run this module to regenerate ``classify_train.jsonl`` and ``classify_eval.jsonl`` in
the demo directory (seeded: the same files every time).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError

LETTERS = "abcdefghij"
GROUPS = {"a-c": "abc", "d-g": "defg", "h-j": "hij"}
FILES = {"train": ("classify_train.jsonl", 1200, 0), "validation": ("classify_eval.jsonl", 150, 1)}


def label_of(text: str) -> str:
    return next(name for name, letters in GROUPS.items() if text[0] in letters)


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows ``{"text", "label"}``, balanced over the groups."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        first = rng.choice(list(GROUPS.values())[i % len(GROUPS)])
        text = first + "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
        rows.append({"text": text, "label": label_of(text)})
    rng.shuffle(rows)
    return rows


def demo_classify(path: str | None, split: str, options: dict[str, Any]):
    """``train`` reads classify_train.jsonl, ``validation`` (or ``eval``/``test``)
    classify_eval.jsonl, from the demo directory or ``path``."""
    from automodel_cli.assets import demo_dir
    from automodel_cli.components.data.loading import load_table

    base = split.split("[")[0]
    name = "train" if base == "train" else "validation" if base in ("validation", "eval", "test") else None
    if name is None:
        raise UserError(f"The classification demo dataset has no split `{split}`.",
                        "Use data.split=train or data.eval_split=validation.")
    root = Path(path) if path else demo_dir()
    return load_table(str(root / FILES[name][0]), "train" + split[len(base):], options)


if __name__ == "__main__":
    from automodel_cli.assets import demo_dir

    for file, count, seed in FILES.values():
        with open(demo_dir() / file, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in make_rows(count, seed))
