"""Writes that fail because of the disk, not the program: a full disk, a quota, a file-size
limit, a read-only or unwritable directory.

The user can fix these (free space, make the directory writable) and continue from the last
checkpoint, so they become a ``UserError`` that says where, what was being written, how much
room a checkpoint takes, and which checkpoint is intact. Other ``OSError``s stay bugs.

The ``OSError`` is often wrapped by the time it reaches us: ``torch.save`` raises a
``RuntimeError`` whose context is the ``OSError``, safetensors a ``SafetensorError`` with
"(os error 28)" in its text, DCP a ``CheckpointException`` with each rank's failure.
``storage_error`` digs it out of any of them. No torch here.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from automodel_cli.components.checkpoint.layout import CHECKPOINTS_DIR, META_FILE
from automodel_cli.errors import UserError

#: errno -> (what happened, what to do about it)
USER_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space on that disk (or move the run to a larger one)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota (or ask for a larger one)"),
    errno.EFBIG: ("a file grew past the largest size allowed (the file system's limit, or `ulimit -f`)",
                  "raise the file-size limit (`ulimit -f unlimited`) or use a file system that allows larger files"),
    errno.EROFS: ("the file system is read-only", "make it writable (or use a writable output_dir)"),
    errno.EACCES: ("permission denied", "make the directory writable for this user (or use another output_dir)"),
    errno.EPERM: ("the operation is not permitted", "make the directory writable for this user (or use another output_dir)"),
}
_OS_ERROR_TEXT = re.compile(r"os error (\d+)")


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures of a DCP exception."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo.append(failure[0] if isinstance(failure, tuple) and failure else failure)


def storage_error(exc: BaseException) -> OSError | None:
    """The disk-related ``OSError`` behind ``exc`` (one of ``USER_ERRNOS``), or None."""
    for item in _linked(exc):
        if not isinstance(item, BaseException):
            continue
        if isinstance(item, OSError) and item.errno in USER_ERRNOS:
            return item
        match = _OS_ERROR_TEXT.search(str(item))
        if match and int(match.group(1)) in USER_ERRNOS:
            code = int(match.group(1))
            return OSError(code, USER_ERRNOS[code][0])
    return None


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def free_space(path: Path) -> int | None:
    """Bytes free for this user on the file system of ``path`` (or its nearest parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _where(error: OSError) -> str:
    return f" while writing {error.filename}" if error.filename else ""


def _room(needed: int | None, needed_what: str, place: Path, code: int) -> str:
    if code not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    parts = []
    if needed:
        parts.append(f"{needed_what} takes about {format_bytes(needed)}")
    free = free_space(place)
    if free is not None:
        parts.append(f"{format_bytes(free)} is free there now")
    return f" ({'; '.join(parts)})" if parts else ""


def checkpoint_write_failed(error: OSError, *, run_dir: Path, step_name: str, previous: Path | None,
                            needed: int | None, published: bool = False) -> UserError:
    """Saving checkpoint ``step_name`` of the run in ``run_dir`` failed because of the disk.
    ``previous`` is the checkpoint a resume would use now, ``needed`` an estimate of a
    checkpoint's size, ``published`` whether the new checkpoint was complete (only updating
    ``latest`` or pruning failed)."""
    what, fix = USER_ERRNOS[error.errno]
    root = Path(run_dir) / CHECKPOINTS_DIR
    room = _room(needed, "a checkpoint of this run", root, error.errno)
    if published:
        kept = f"{step_name} itself was written completely; updating `latest` or pruning old checkpoints failed."
    elif previous is not None:
        kept = f"The unfinished checkpoint was removed; the previous checkpoint, {previous.name}, is intact."
    else:
        kept = "The unfinished checkpoint was removed; there is no earlier checkpoint."
    if previous is not None:
        resume = f"continue from {previous.name} with `checkpoint.resume=auto --output-dir {run_dir}`"
    else:
        resume = f"rerun with `checkpoint.resume=auto --output-dir {run_dir}` (it starts again from step 0)"
    return UserError(
        f"Could not save checkpoint {step_name} in {root}: {what}{_where(error)}{room}. {kept}",
        f"To go on, {fix}, then {resume}.",
    )


def final_write_failed(error: OSError, *, output_dir: Path, latest: Path | None, needed: int | None) -> UserError:
    """Writing ``output_dir/final`` failed because of the disk; ``latest`` is the run's newest
    checkpoint (None when it saved none)."""
    what, fix = USER_ERRNOS[error.errno]
    room = _room(needed, "the final model", Path(output_dir), error.errno)
    if latest is not None:
        kept = f"The run's checkpoints are intact (the latest is {latest.name})."
        resume = (f"rerun with `checkpoint.resume=auto --output-dir {output_dir}`: it continues from "
                  f"{latest.name} and writes final/ at the end")
    else:
        kept = "The run saved no checkpoint (checkpoint.every_steps), so there is nothing to continue from."
        resume = f"rerun with `checkpoint.resume=auto --output-dir {output_dir}` (it trains again from step 0)"
    return UserError(
        f"Could not write the final model to {Path(output_dir) / 'final'}: {what}{_where(error)}{room}. "
        f"The partial copy was removed and final/ was left as it was. {kept}",
        f"To go on, {fix}, then {resume}.",
    )


def checkpoint_bytes(checkpoint: Path | None) -> int | None:
    """The size of a finished checkpoint, from the file list in its meta.json."""
    if checkpoint is None:
        return None
    try:
        files: dict[str, Any] = json.loads((checkpoint / META_FILE).read_text(encoding="utf-8"))["files"]
        return sum(int(info["size"]) for info in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None
