"""Dataset factories registered as ``data.name`` (see ``automodel_cli.plugins.datasets``).

Every factory has the signature ``fn(path, split, options) -> datasets.Dataset`` and returns
either ``prompt``/``completion`` columns or a ``messages`` column, so the one tokeniser in
tokenization.py serves them all. Benchmark-shaped sets (SQuAD, HellaSwag) are converted here,
in their real published schemas, so a user can point ``data.path`` at the hub id *or* at a
local copy of the same files.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.errors import UserError
from automodel_cli.components.data.loading import load_table

SQUAD_HUB_ID = "rajpurkar/squad"
HELLASWAG_HUB_ID = "Rowan/hellaswag"


def instruction(path: str | None, split: str, options: dict[str, Any]):
    """Generic instruction data (what ``data.name=auto`` means): the raw table, unchanged.

    Column mapping (``data.prompt_column`` / ``data.completion_column`` /
    ``data.messages_column``) happens in ``tokenize_sft`` so its error can list the columns.
    """
    if not path:
        raise UserError(
            "No training data: data.path is not set.",
            "Set data.path=<file.jsonl, directory or hub id>, or use a named dataset such as "
            "data.name=demo (see `automodel list datasets`).",
        )
    return load_table(path, split, options)


def squad(path: str | None, split: str, options: dict[str, Any]):
    """SQuAD (id, title, context, question, answers{text, answer_start}) as extractive QA.

    prompt ``"Context: ...\\nQuestion: ...\\nAnswer:"``, completion ``" <first answer>"``.
    Unanswerable rows (SQuAD v2, empty ``answers.text``) are dropped.
    """
    table = load_table(path or SQUAD_HUB_ID, split, options)
    _require_columns(table, ("context", "question", "answers"), "squad", path or SQUAD_HUB_ID)

    def convert(batch: dict[str, list]) -> dict[str, list]:
        prompts, completions = [], []
        for context, question, answers in zip(batch["context"], batch["question"], batch["answers"]):
            texts = (answers or {}).get("text") or []
            if not texts:
                continue
            prompts.append(f"Context: {context}\nQuestion: {question}\nAnswer:")
            completions.append(f" {texts[0]}")
        return {"prompt": prompts, "completion": completions}

    converted = table.map(convert, batched=True, remove_columns=table.column_names)
    return _non_empty(converted, "squad", path or SQUAD_HUB_ID, "has an answer")


def hellaswag(path: str | None, split: str, options: dict[str, Any]):
    """HellaSwag (ctx, endings[4], label) as continuation SFT: prompt ``ctx``, completion
    ``" " + endings[int(label)]``. Rows without a label (the public test split) are dropped."""
    table = load_table(path or HELLASWAG_HUB_ID, split, options)
    source = path or HELLASWAG_HUB_ID
    _require_columns(table, ("ctx", "endings", "label"), "hellaswag", source)

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompts, completions = [], []
        for index, ctx, endings, label in zip(indices, batch["ctx"], batch["endings"], batch["label"]):
            if label is None or str(label).strip() == "":
                continue
            try:
                choice = int(label)
                ending = endings[choice]
            except (ValueError, TypeError, IndexError) as exc:
                raise UserError(
                    f"hellaswag data `{source}` row {index}: label {label!r} does not select "
                    f"one of the {len(endings or [])} endings.",
                    "label must be the index (0-3, as int or string) of the correct ending.",
                ) from exc
            prompts.append(ctx)
            completions.append(" " + ending.lstrip())
        return {"prompt": prompts, "completion": completions}

    converted = table.map(convert, batched=True, with_indices=True, remove_columns=table.column_names)
    return _non_empty(converted, "hellaswag", source, "has a label")


def demo(path: str | None, split: str, options: dict[str, Any]):
    """The bundled offline demo (string reversal). ``train`` reads train.jsonl; ``validation``,
    ``eval`` or ``test`` read eval.jsonl. ``path`` may point at a regenerated copy."""
    from pathlib import Path

    from automodel_cli.assets import demo_dir

    root = Path(path) if path else demo_dir()
    base = split.split("[")[0]
    if base in ("train",):
        file = "train.jsonl"
    elif base in ("validation", "eval", "test"):
        file = "eval.jsonl"
    else:
        raise UserError(
            f"The demo dataset has no split `{split}`.",
            "Use data.split=train (train.jsonl) or validation (eval.jsonl).",
        )
    slice_ = split[len(base):]
    return load_table(str(root / file), "train" + slice_, options)


def _require_columns(table, required: tuple[str, ...], name: str, source: str) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise UserError(
            f"{name} data `{source}` lacks column(s) {missing}; it has {table.column_names}.",
            f"data.name={name} expects the published {name} schema ({', '.join(required)}). "
            "For other data use data.name=auto with prompt/completion or messages columns.",
        )


def _non_empty(table, name: str, source: str, condition: str):
    if len(table) == 0:
        raise UserError(
            f"{name} data `{source}` has no row that {condition}.",
            "Pick another split (data.split) or file.",
        )
    return table
