"""Where checkpoints live inside a run directory, and how to tell finished ones apart.

::

    RUN_DIR/checkpoints/
        step_00000100/          a finished checkpoint (published by one atomic rename):
            meta.json           written last; lists every file with its size and sha256
            train_state.json    step, epoch, ... (JSON)
            scheduler.pt        LR scheduler state (weights_only)
            model/              DCP directory: trainable parameters, sharded per rank
            optim/              DCP directory: optimizer state keyed by parameter name
            rng/rank_R.pt       RNG states of rank R (weights_only)
            hf/                 config.json, generation_config.json, tokenizer files,
                                adapter_config.json: what `checkpoint consolidate` needs
        step_00000200/
        latest                  text file naming the newest finished checkpoint ("step_00000200")
        .tmp-step_00000300-PID  being written by process PID (or left by a crash)
        .trash-step_...-PID     being deleted by pruning (or left by a crash)

Only ``step_*`` directories that contain ``meta.json`` are checkpoints; everything starting
with a dot is scratch space that readers ignore and the next save cleans up. No torch here.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from automodel_cli.components.checkpoint.fsio import atomic_write_text, pid_alive, remove_tree
from automodel_cli.run_layout import RunDir

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = RunDir.CHECKPOINTS
LATEST_FILE = "latest"
META_FILE = "meta.json"
MODEL_DIR = "model"            # DCP: .metadata + __RANK_I.distcp shards (trainable parameters)
OPTIMIZER_DIR = "optim"        # DCP: optimizer state keyed by parameter name
RNG_DIR = "rng"                # rng/rank_R.pt, one per rank
HF_DIR = "hf"                  # config.json, tokenizer files, adapter_config.json (for consolidate)
SCHEDULER_FILE = "scheduler.pt"
TRAIN_STATE_FILE = "train_state.json"

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_SCRATCH = re.compile(r"^\.(?:tmp-.+-|trash-.+-|latest\.tmp-)(\d+)$")


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank}.pt"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step_XXXXXXXX`` directory name, or None for anything else."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def is_checkpoint_dir(path: Path) -> bool:
    """A finished checkpoint: a directory holding ``meta.json`` (written inside the temp dir
    before the publishing rename, so it is never present in a half-written one)."""
    return path.is_dir() and (path / META_FILE).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = parse_step(child.name)
        if step is not None and is_checkpoint_dir(child):
            found.append((step, child))
    return sorted(found)


def temp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}-{os.getpid()}"


def trash_path_for(root: Path, name: str) -> Path:
    return root / f".trash-{name}-{os.getpid()}"


def read_latest_name(root: Path) -> str | None:
    """The directory name stored in ``latest``, or None if the file is absent or unreadable."""
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if parse_step(name) is not None else None


def write_latest(root: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically (readers see the old or the new name)."""
    atomic_write_text(root / LATEST_FILE, name + "\n")


def resolve_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to; if the pointer is missing or names a directory
    that is gone, fall back to the newest finished checkpoint (pointer files copied without
    their directories, or hand-deleted checkpoints, should not block a resume)."""
    name = read_latest_name(root)
    if name is not None and is_checkpoint_dir(root / name):
        return root / name
    finished = list_checkpoints(root)
    if not finished:
        return None
    if (root / LATEST_FILE).exists():
        log.warning(
            "%s does not name a finished checkpoint; using the newest one, %s",
            root / LATEST_FILE, finished[-1][1].name,
        )
    return finished[-1][1]


def clean_scratch(root: Path) -> list[Path]:
    """Remove temp and trash entries left by processes that are gone (or by this process).

    A live process's scratch is left alone so that two runs sharing a directory by mistake do
    not destroy each other's in-flight save. Returns what was removed.
    """
    removed = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        match = _SCRATCH.match(child.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            remove_tree(child)
            removed.append(child)
    return removed
