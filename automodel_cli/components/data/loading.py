"""Load one split of a table: a local file, a directory of files, or a Hugging Face hub dataset.

Why a wrapper around ``datasets.load_dataset``: its errors are written for library users
(pyarrow parse errors without line numbers, connection retries, split lists), while ours must
tell a CLI user exactly what to fix. So local JSON is pre-scanned with ``json.loads`` to report
the file, line and column of the first malformed record, a missing path is reported before
anything is tried on the hub, and hub failures become one paragraph that suggests a local file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError

#: File suffix -> ``datasets`` packaged builder.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

#: Names a split may have in file names inside a data directory.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "eval", "dev"),
    "test": ("test", "testing"),
}
for _aliases in list(_SPLIT_ALIASES.values()):
    for _alias in _aliases:
        _SPLIT_ALIASES.setdefault(_alias, _aliases)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

_FORMATS_HINT = "a .jsonl, .json, .parquet or .csv file (or a directory of them)"


def load_table(path: str, split: str = "train", options: dict | None = None):
    """Load ``split`` of ``path`` as a ``datasets.Dataset``.

    ``path`` is a local file, a local directory of data files, or a hub dataset id. For local
    files ``split`` only matters in a directory (files named after the split are picked) or for
    a slice (``train[:100]``); a single file is its own train split. ``options`` are passed to
    ``datasets.load_dataset`` (e.g. ``field`` for nested JSON, ``name`` for a hub config).
    Every user-fixable problem raises ``UserError``.
    """
    options = dict(options or {})
    local = Path(str(path)).expanduser()
    if local.exists():
        dataset = _load_local(local, split, options)
    elif _looks_local(str(path)):
        raise UserError(
            f"Data file `{path}` does not exist (resolved to {local.resolve()}).",
            f"Check data.path; it must be {_FORMATS_HINT}, or a hub dataset id such as "
            "`rajpurkar/squad`.",
        )
    else:
        dataset = _load_hub(str(path), split, options)
    if len(dataset) == 0:
        raise UserError(
            f"Dataset `{path}` (split `{split}`) has no rows.",
            "Point data.path at a file with at least one sample, or pick another data.split.",
        )
    return dataset


def _looks_local(path: str) -> bool:
    """A path that cannot be a hub id (``org/name``) must be a missing local file."""
    if path.startswith((".", "/", "~")) or "\\" in path:
        return True
    if any(path.lower().endswith(ext) for ext in SUPPORTED_EXTENSIONS):
        return True
    return not _HUB_ID.match(path)


# --------------------------------------------------------------------------------------- local


def _load_local(path: Path, split: str, options: dict[str, Any]):
    files = _data_files(path, split)
    builders = {SUPPORTED_EXTENSIONS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        listed = ", ".join(f.name for f in files)
        raise UserError(
            f"Data directory `{path}` mixes file formats ({listed}).",
            "Keep one format per directory, or point data.path at a single file.",
        )
    builder = builders.pop()
    if builder == "json":
        for file in files:
            _prescan_json(file, options)

    import datasets

    # A local table has a single split; keep any slice the user asked for ("train[:10%]").
    bracket = split.find("[")
    local_split = "train" + (split[bracket:] if bracket >= 0 else "")
    try:
        dataset = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split=local_split, **options
        )
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as exc:
        if "corresponds to no data" in str(exc):  # the split of an empty table
            raise UserError(
                f"{_describe(path, files)} has no rows.", "Add at least one sample."
            ) from exc
        cause = exc.__cause__ or exc
        raise UserError(
            f"Could not read {_describe(path, files)} as {builder} "
            f"({type(cause).__name__}: {_first_line(cause)}).",
            "Make every row have the same columns with consistent types, and check "
            "data.options (passed to datasets.load_dataset).",
        ) from exc
    return dataset


def _data_files(path: Path, split: str) -> list[Path]:
    """The data files for ``path``: itself, or the (split-named) data files under a directory."""
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise UserError(
                f"Data file `{path}` has an unsupported extension `{path.suffix}`.",
                f"data.path must be {_FORMATS_HINT}, or a hub dataset id.",
            )
        return [path]
    files = sorted(
        f for f in path.rglob("*")
        if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise UserError(
            f"Data directory `{path}` contains no data files.",
            f"Put {_FORMATS_HINT} in it, or point data.path at a file.",
        )
    by_split: dict[str, list[Path]] = {}
    for f in files:
        name = _split_of(f.relative_to(path))
        if name:
            by_split.setdefault(name, []).append(f)
    if not by_split:
        return files
    wanted = _SPLIT_ALIASES.get(split.split("[")[0], (split.split("[")[0],))
    chosen = [f for name, fs in by_split.items() if name in wanted for f in fs]
    if not chosen:
        raise UserError(
            f"Data directory `{path}` has files for splits {sorted(by_split)} but none for "
            f"split `{split}`.",
            f"Set data.split (or data.eval_split) to one of {sorted(by_split)}, or point "
            "data.path at a single file.",
        )
    return sorted(chosen)


def _split_of(relative: Path) -> str | None:
    """Split named by a file (``train.jsonl``, ``train-00000-of-00002.parquet``) or folder."""
    for part in [*relative.parts[:-1], relative.stem]:
        head = re.split(r"[-_.]", part.lower(), maxsplit=1)[0]
        if head in _SPLIT_ALIASES:
            return head
    return None


def read_json_rows(path: str | Path, split: str = "train", options: dict | None = None) -> list[tuple[Path, int, dict]]:
    """The rows of a local .json/.jsonl file (or of the split's JSON files in a directory) as
    ``(file, row number, row)``, parsed with ``json`` rather than Arrow: for data whose rows do
    not share one Arrow schema (a chat ``content`` that is a string in one row and a list of text
    and image parts in the next). Same errors as ``load_table``; row numbers count from 1."""
    options = dict(options or {})
    local = Path(str(path)).expanduser()
    if not local.exists():
        raise UserError(
            f"Data file `{path}` does not exist (resolved to {local.resolve()}).",
            f"Check data.path; it must be {_FORMATS_HINT}.",
        )
    rows = []
    for file in _data_files(local, split):
        if SUPPORTED_EXTENSIONS[file.suffix.lower()] != "json":
            raise UserError(
                f"`{file}` is not a .json/.jsonl file.",
                "Give this dataset its rows as JSON Lines (one object per line) or a JSON array.",
            )
        rows += [(file, number, row) for number, row in enumerate(_prescan_json(file, options), start=1)]
    return rows


def _prescan_json(file: Path, options: dict[str, Any]) -> list[dict]:
    """Parse a .json/.jsonl file with ``json`` first, so errors name the line and column; the
    parsed rows are returned."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{file}: not UTF-8 text (byte {exc.start}: {exc.reason}).",
            "Re-save the file as UTF-8.",
        ) from exc
    if file.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" means JSON Lines saved as .json
                raise UserError(
                    f"{file} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}).",
                    "Fix the file; a .json file must hold one JSON array of objects "
                    "(or use .jsonl with one object per line).",
                ) from exc
        else:
            return _check_json_document(file, document, options)
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{file} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}).",
                "Fix or delete that line; each line of a JSON Lines file must be one JSON "
                "object such as {\"prompt\": \"...\", \"completion\": \"...\"}.",
            ) from exc
        if not isinstance(row, dict):
            raise UserError(
                f"{file} line {lineno}: expected a JSON object, got {type(row).__name__}.",
                "Each line must be one object mapping column names to values.",
            )
        rows.append(row)
    if not rows:
        raise UserError(f"Data file `{file}` has no rows.", "Add at least one JSON object line.")
    return rows


def _check_json_document(file: Path, document: Any, options: dict[str, Any]) -> list[dict]:
    field = options.get("field")
    if field is not None:
        if not isinstance(document, dict) or field not in document:
            keys = sorted(document) if isinstance(document, dict) else []
            raise UserError(
                f"{file}: data.options.field=`{field}` is not a top-level key (keys: {keys}).",
                "Set data.options.field to the key that holds the list of rows.",
            )
        document = document[field]
    if isinstance(document, dict):
        lists = sorted(k for k, v in document.items() if isinstance(v, list))
        raise UserError(
            f"{file}: the top level is a JSON object, not a list of rows.",
            f"Set data.options.field to the key that holds the rows (list-valued keys: {lists}), "
            "or store the rows as a JSON array or as JSON Lines.",
        )
    if not isinstance(document, list):
        raise UserError(f"{file}: expected a JSON array of objects, got {type(document).__name__}.")
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise UserError(
                f"{file}: element {index} of the top-level array is {type(row).__name__}, "
                "not an object.",
                "Each element must map column names to values.",
            )
    if not document:
        raise UserError(f"Data file `{file}` has no rows.", "Add at least one object to the array.")
    return document


# ----------------------------------------------------------------------------------------- hub


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the hub did not give us this dataset" (network, offline, 404, auth)."""
    errors: list[type[BaseException]] = [OSError]  # ConnectionError, HfHubHTTPError, *NotFound*
    try:
        from huggingface_hub.errors import HFValidationError

        errors.append(HFValidationError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover - older hubs use requests (an OSError)
        pass
    return tuple(errors)


def _load_hub(path: str, split: str, options: dict[str, Any]):
    import datasets

    try:
        return datasets.load_dataset(path, split=split, **options)
    except _hub_errors() as exc:
        raise UserError(
            f"Dataset `{path}` could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {_first_line(exc)}).",
            f"Check the id, your network and HF_HUB_OFFLINE / HF_TOKEN, or download it and pass "
            f"a local file with data.path=<{_FORMATS_HINT}>.",
        ) from exc
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(
                f"Dataset `{path}` has no split `{split}` ({_first_line(exc)}).",
                "Set data.split (or data.eval_split) to one of the splits listed.",
            ) from exc
        raise


def _describe(path: Path, files: list[Path]) -> str:
    return f"`{files[0]}`" if len(files) == 1 else f"the {len(files)} files under `{path}`"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
