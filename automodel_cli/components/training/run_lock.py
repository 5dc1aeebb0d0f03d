"""One run per output directory: an exclusive lock taken before anything loads.

Two runs writing one directory would interleave ``metrics.jsonl``, checkpoints and ``final/``.
The first run to start holds ``OUTPUT_DIR/.automodel.lock``; a second one is refused, naming the
holder (host, pid, recipe, start time), before it reads a byte of data or weights.

The lock is a kernel lock (``flock``) on that file, so it disappears with its process however
the process ends (exit, exception, ``kill -9``, a node reboot): a killed run never blocks the
next one. The file also records who holds it; a record left by a run that did not end cleanly is
reported when the next run takes over. Where a filesystem has no working ``flock`` (some network
and FUSE filesystems), the record alone decides: a holder on this host whose pid is gone is taken
over; a holder on another host is trusted until the user deletes the file (docs/finetune.md).

Taking the lock also proves the directory is writable: a read-only or impossible ``output_dir``
is reported here, not after the model has loaded. In a multi-process run only global rank 0
holds the lock (the other ranks of the job are not a second run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir
from automodel_cli.errors import UserError

LOCK_FILE = RunDir.LOCK
#: errno values meaning "this filesystem does not do flock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

#: Locks held by this process, by directory: released by ``release_all`` when the command ends.
_HELD: dict[Path, RunLock] = {}


@dataclass
class RunLock:
    """A held lock; ``release`` gives it up (and removes what taking it created, if unused)."""

    directory: Path
    fd: int
    record: dict[str, Any]
    created: list[Path] = field(default_factory=list)  # directories made for the run, outermost first
    previous: dict[str, Any] | None = None  # the record the last holder left
    before: bytes | None = None  # the lock file's bytes before this run (None: there was none)
    writing: bool = False  # set by ``mark_writing`` once the run writes its outputs

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def release(self) -> None:
        """Give the lock up. A run that wrote outputs leaves its record, marked released; one
        refused before writing anything leaves the directory as it found it: the lock file's
        old bytes, or no lock file, or no directory at all if it made it."""
        if self.fd < 0:
            return
        unused = False
        try:
            if self.writing:
                _write_record(self.fd, {**self.record, "released": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            elif self.before is None:
                self.path.unlink(missing_ok=True)
                unused = bool(self.created) and not any(self.directory.iterdir())
            else:
                _write_bytes(self.fd, self.before)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # the kernel drops the lock when the descriptor closes anyway
        finally:
            os.close(self.fd)
            self.fd = -1
            _HELD.pop(self.directory, None)
        if unused:  # the run failed before writing anything: leave no empty directory behind
            for directory in reversed(self.created):
                try:
                    directory.rmdir()
                except OSError:
                    break


def acquire(directory: Path, recipe: str) -> RunLock:
    """Create ``directory`` if needed, prove it writable and lock it for this run.

    Raises ``UserError`` (exit 2) when the directory cannot be created or written, or when
    another live run holds it."""
    directory = Path(directory).absolute()
    if directory in _HELD:  # an earlier run of this process (tests, notebooks) has ended
        _HELD[directory].release()
    created = _make_directory(directory)
    _check_writable(directory)
    for _ in range(3):  # a holder that removes its unused lock file while we open it: try again
        existed = (directory / LOCK_FILE).exists()
        fd = _open_lock_file(directory)
        before = os.pread(fd, 1 << 20, 0) if existed else None
        previous = _read_record(fd)
        if not _lock(fd, directory, previous):
            os.close(fd)
            raise in_use(directory, previous)
        if _same_file(fd, directory / LOCK_FILE):
            break
        os.close(fd)
    else:
        raise UserError(f"Could not lock output_dir `{directory}`: its lock file keeps being replaced.",
                        "Make sure no other program is managing that directory, then try again.")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "recipe": recipe,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_record(fd, record)
    lock = RunLock(directory, fd, record, created, previous, before)
    _HELD[directory] = lock
    return lock


def stale_note(lock: RunLock) -> str | None:
    """One line when the previous holder ended without releasing the lock (killed, crashed)."""
    previous = lock.previous
    if not previous or previous.get("released") or "pid" not in previous:
        return None
    return (f"note: the previous run in this directory (pid {previous['pid']} on {previous.get('host', '?')}, "
            f"started {previous.get('started', '?')}) ended without releasing its lock; this run takes over.")


def holder(directory: Path) -> dict[str, Any] | None:
    """Who holds ``directory``'s lock now, or None; creates and changes nothing."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        record = _read_record(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return record or {}
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return record if _record_alive(record) else None
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def mark_writing(directory: Path) -> None:
    """The run holding ``directory`` starts writing its outputs: from now on its lock record stays
    (marked released at the end) instead of the directory being restored as it was found."""
    lock = _HELD.get(Path(directory).absolute())
    if lock is not None:
        lock.writing = True


def release_all() -> None:
    """Release every lock this process holds (the command has ended)."""
    for lock in list(_HELD.values()):
        lock.release()


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record or "pid" not in record:
        return "another process"
    return (f"pid {record['pid']} on host {record.get('host', '?')} "
            f"(`{record.get('recipe', '?')}`, started {record.get('started', '?')})")


# ------------------------------------------------------------------------------ details
def _make_directory(directory: Path) -> list[Path]:
    missing = []
    for path in [directory, *directory.parents]:
        if path.exists():
            break
        missing.append(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(directory, exc) from None
    if not directory.is_dir():
        raise UserError(f"output_dir `{directory}` exists and is not a directory.", "Choose another --output-dir.")
    return list(reversed(missing))


def _check_writable(directory: Path) -> None:
    """Create and delete a scratch file: permission bits alone miss read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _not_writable(directory, exc) from None


def _not_writable(directory: Path, exc: OSError) -> UserError:
    reason = exc.strerror or type(exc).__name__
    return UserError(
        f"output_dir `{directory}` cannot be created or written: {reason} ({exc.filename or directory}). Nothing was loaded "
        f"or written.",
        "Choose a directory you can write to with --output-dir DIR (or output_dir=DIR).",
    )


def _open_lock_file(directory: Path) -> int:
    try:
        return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _not_writable(directory, exc) from None


def _lock(fd: int, directory: Path, previous: dict[str, Any] | None) -> bool:
    """Take the lock; False when a live run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise _not_writable(directory, exc) from None
    # No flock here: the record decides.
    return not (previous and not previous.get("released") and _record_alive(previous)
                and previous.get("pid") != os.getpid())


def _record_alive(record: dict[str, Any] | None) -> bool:
    """Whether the record's process may still run: certainly gone only on this host."""
    if not record or "pid" not in record or record.get("released"):
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    _write_bytes(fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))


def _write_bytes(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def in_use(directory: Path, record: dict[str, Any] | None) -> UserError:
    return UserError(
        f"output_dir `{directory}` is in use by another run: {describe_holder(record)}. Nothing was loaded "
        f"or written.",
        "Wait for that run to finish (or stop it), or choose another --output-dir. If you are sure no run uses "
        f"the directory (a job on another machine that died with the lock on a shared filesystem), delete "
        f"{directory / LOCK_FILE}.",
    )
