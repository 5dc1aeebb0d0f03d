"""The distill demo's teacher: ``automodel finetune demo``, trained once per machine and cached.

``automodel distill demo`` needs a trained teacher and, like the other demos, must run offline
with no arguments. No weights are shipped: the first run trains the finetune demo (the bundled
two-layer Llama on the string-reversal task) and caches the run under ``cache_root()``; later
runs load it. The entry's name holds a key (package version plus a hash of the demo assets and
of the resolved training config), so changing any of them trains a new teacher instead of
reusing a stale one.

Nothing half-trained is ever used: the teacher is trained by ``automodel finetune demo`` in a
child process (without torchrun's variables, so it is a plain one-process run whatever started
the distillation) into a temporary directory beside the entry, which is renamed into place
(``os.replace``) only once training succeeded. A lock file makes concurrent first runs train it
once (the others wait, then use it); where locks do not work, each trains and the first rename
wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError
from automodel_cli.run_layout import RunDir

#: Overrides where the cache lives (default ``$XDG_CACHE_HOME/automodel``, else ``~/.cache/automodel``).
CACHE_ENV = "AUTOMODEL_CACHE_DIR"
#: The command that trains the teacher (plus ``-o DIR``): the finetune demo as users run it.
TEACHER_ARGS = ("finetune", "demo", "logging.progress=false")
#: The model directory inside a cache entry (a finetune run's ``RUN_DIR/final``).
MODEL_SUBDIR = RunDir.FINAL
#: Variables set by torchrun and our launcher: inherited, they would make the child a rank.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                  "AUTOMODEL_LAUNCH_ERROR_FILE")


def cache_root() -> Path:
    """Where automodel caches what it builds itself."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "automodel"


def teacher_key(registries: Any) -> str:
    """Package version plus a hash of the demo assets and of the teacher's resolved config (its
    machine-specific ``model.path`` aside: the assets' contents stand for the model)."""
    from automodel_cli import __version__
    from automodel_cli.assets import demo_dir
    from automodel_cli.config.assemble import resolve_command, split_arguments

    target, overrides = split_arguments(list(TEACHER_ARGS[1:]))
    resolved = resolve_command(registries, recipe=registries.recipes.get(TEACHER_ARGS[0]), target=target,
                               config_files=[], overrides=overrides)
    settings = {**resolved.tree, "model": {**resolved.tree["model"], "path": None}, "output_dir": None}
    assets = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
              for path in sorted(demo_dir().iterdir()) if path.is_file()}
    blob = json.dumps({"assets": assets, "settings": settings}, sort_keys=True, default=str)
    return f"{__version__}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cache_entry(registries: Any) -> Path:
    """The directory that holds (or will hold) the teacher's finetune run."""
    return cache_root() / f"demo-teacher-{teacher_key(registries)}"


def model_dir(entry: Path) -> Path:
    return entry / MODEL_SUBDIR


def is_complete(entry: Path) -> bool:
    model = model_dir(entry)  # written by our finetune recipe: config.json and safetensors
    return (model / "config.json").is_file() and any(model.glob("*.safetensors"))


def ensure_teacher(entry: Path, say: Callable[[str], None]) -> Path:
    """The teacher's model directory: cached, or trained now and cached."""
    if is_complete(entry):
        say(f"demo teacher: using the cached {model_dir(entry)} (trained once by `automodel finetune demo`)")
        return model_dir(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_error(entry, error) from None
    with _lock(entry.parent / f"{entry.name}.lock") as exclusive:
        if is_complete(entry):  # another run trained it while this one waited
            say(f"demo teacher: using {model_dir(entry)}, trained meanwhile by another run")
            return model_dir(entry)
        if exclusive:
            _remove_leftovers(entry)
        say(f"demo teacher: none cached yet, training it once (`automodel finetune demo`) and caching it in "
            f"{entry} ({CACHE_ENV} moves the cache)")
        started = time.perf_counter()
        _train(entry)
    say(f"demo teacher: trained in {time.perf_counter() - started:.0f} s and cached")
    return model_dir(entry)


@contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (released by the OS if this process dies); yields
    whether the lock is held (False where the file system cannot lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield False
        return
    try:
        handle = open(path, "a")
    except OSError as error:
        raise _cache_error(path.parent, error) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(entry: Path) -> None:
    """Temporary directories of killed first runs and an entry that lost files (only called
    while holding the lock, so no other run is writing them)."""
    for leftover in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)


def _train(entry: Path) -> None:
    """``automodel finetune demo -o TMP`` in a child process, then TMP renamed to ``entry``."""
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError as error:
        raise _cache_error(entry, error) from None
    environment = {name: value for name, value in os.environ.items()
                   if name not in RANK_VARIABLES and not name.startswith("TORCHELASTIC_")}
    command = [sys.executable, "-m", "automodel_cli", *TEACHER_ARGS, "-o", str(temporary)]
    try:
        result = subprocess.run(command, env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        (temporary / "train.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0 or not is_complete(temporary):
            tail = " | ".join(line.strip() for line in (result.stderr or result.stdout).strip().splitlines()[-3:])
            tail = tail.rstrip(".")
            raise UserError(
                f"Training the distill demo's teacher (`automodel finetune demo`) failed with exit code "
                f"{result.returncode}: {tail or 'no output'}. Nothing was cached.",
                "Run `automodel finetune demo` to see the whole output, or give a teacher with "
                "distill.teacher_path=DIR (a finetune run's RUN_DIR/final).",
            )
        try:
            os.replace(temporary, entry)
        except OSError as error:
            if not is_complete(entry):  # not another run's finished teacher: a real failure
                raise _cache_error(entry, error) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _cache_error(path: Path, error: OSError) -> UserError:
    return UserError(f"Cannot write the demo teacher's cache at `{path}` ({error.strerror or error}).",
                     f"Set {CACHE_ENV} to a writable directory, or give a teacher with distill.teacher_path=DIR.")
