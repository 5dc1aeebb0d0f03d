"""Alpaca-schema data: each row has instruction, optional input, and output."""

from __future__ import annotations


def _to_prompt_completion(row: dict) -> dict:
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    return {"prompt": f"{prompt}\n\n### Response:\n", "completion": row["output"]}


def load_alpaca(path: str | None, split: str, options: dict):
    """Load an Alpaca-style JSONL file and map it to prompt/completion columns."""
    import datasets

    table = datasets.load_dataset("json", data_files=path, split="train")
    return table.map(_to_prompt_completion, remove_columns=table.column_names)
