"""``metrics.jsonl``: one JSON object per optimizer step, always written by the recipes.

Each line is flushed as soon as it is written, so a run killed at any moment keeps every
completed step. A resumed run first calls ``truncate_after(path, resumed_step)`` so that steps
logged after the checkpoint (and redone now) do not appear twice. Non-finite numbers are written
as ``NaN``/``Infinity`` (what Python's and pandas' JSON readers accept), because a loss that
became NaN is exactly what a user needs to see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir
from automodel_cli.components.logging.base import plain_metrics

METRICS_FILE = RunDir.METRICS


class JsonlLogger:
    """Append ``{"step": step, **metrics}`` lines to ``path`` (created with its parents)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            self._file.write("\n")  # a line cut short by a kill must not swallow the next one

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": int(step), **{k: v for k, v in plain_metrics(metrics).items() if k != "step"}}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _parse(line: str) -> dict[str, Any] | None:
    """A complete record, or None for a cut-off or garbled line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
        return record
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record in a metrics file, in order (broken lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [r for r in map(_parse, text.splitlines()) if r is not None]


def truncate_after(path: Path, step: int) -> int:
    """Drop records with ``step > step`` (and broken lines); return how many lines went.

    Kept lines are copied byte for byte. The file is rewritten through a temp file and
    ``os.replace``, so a crash here leaves either the old or the new file. A missing file is
    fine (nothing logged yet).
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = [line for line in lines if (record := _parse(line)) is not None and record["step"] <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)
