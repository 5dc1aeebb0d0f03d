"""Write a resumable checkpoint so that a crash at any moment leaves the previous one intact.

The sequence, each step durable before the next:

1. remove scratch left by dead processes (``.tmp-*``, ``.trash-*``);
2. write every file into ``checkpoints/.tmp-step_XXXXXXXX-PID/`` and fsync it;
3. publish it with one ``os.replace`` to ``step_XXXXXXXX`` and fsync ``checkpoints/``;
4. point ``latest`` at it (temp file + ``os.replace``);
5. prune old checkpoints by renaming them to ``.trash-*`` first, then deleting.

Until step 3 nothing visible changed; between 3 and 4 ``latest`` still names the previous
checkpoint, which is whole; pruning never touches the new checkpoint or ``latest``'s target.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint import layout
from automodel_cli.components.checkpoint.fsio import fsync_dir, remove_tree, write_bytes_durably
from automodel_cli.components.checkpoint.rng import capture_rng_state
from automodel_cli.components.checkpoint.state import (
    save_model_state,
    save_optimizer_state,
    save_scheduler_state,
    save_torch,
    signature_checksum,
)
from automodel_cli.errors import UserError

#: Bump when the directory layout or a file format changes incompatibly.
FORMAT_VERSION = 1
FORMAT_NAME = "automodel-checkpoint"


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    train_state: dict[str, Any],
    keep: int | None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Save ``run_dir/checkpoints/step_{step:08d}/`` atomically and return its path.

    ``train_state`` must be JSON-serialisable (step, epoch, samples consumed, seeds...); the
    step is always recorded in it. ``generators`` are extra RNGs the recipe owns (e.g. the
    data-order generator), restored by name by ``load_checkpoint``. ``keep`` is how many
    checkpoints to retain (None keeps all).
    """
    if keep is not None and keep < 1:
        raise UserError(f"checkpoint.keep must be at least 1, got {keep}.",
                        "Use 1 to keep only the newest checkpoint.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    state_json = _train_state_json(train_state, step)  # fail before touching the disk

    root = layout.checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    layout.clean_scratch(root)
    final = root / layout.step_dir_name(step)
    tmp = layout.temp_dir_for(root, step)
    remove_tree(tmp)
    tmp.mkdir()
    try:
        write_payload(tmp, step, model=model, optimizer=optimizer, scheduler=scheduler,
                      state_json=state_json, generators=generators)
        publish(tmp, final)
    except BaseException:
        remove_tree(tmp)  # best effort; a SIGKILL leaves it for the next save to clean
        raise
    layout.write_latest(root, final.name)
    prune(root, keep, protect={final.name})
    return final


def _train_state_json(train_state: dict[str, Any], step: int) -> str:
    try:
        return json.dumps({**train_state, "step": step}, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"train_state must be JSON-serialisable: {exc}") from exc


def write_payload(directory: Path, step: int, *, model, optimizer, scheduler, state_json: str,
                  generators: dict[str, torch.Generator] | None) -> None:
    """Write every file of a checkpoint into ``directory``; ``meta.json`` goes last."""
    signature = save_model_state(model, directory)
    files = [layout.MODEL_FILE]
    if optimizer is not None:
        save_optimizer_state(optimizer, directory)
        files.append(layout.OPTIMIZER_FILE)
    if scheduler is not None:
        save_scheduler_state(scheduler, directory)
        files.append(layout.SCHEDULER_FILE)
    save_torch(capture_rng_state(generators), directory / layout.RNG_FILE)
    write_bytes_durably(directory / layout.TRAIN_STATE_FILE, state_json.encode("utf-8"))
    files += [layout.RNG_FILE, layout.TRAIN_STATE_FILE]
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "files": files,
        "params_sha256": signature_checksum(signature),
        "params": signature,
    }
    write_bytes_durably(directory / layout.META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
    fsync_dir(directory)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir to its final name in one step.

    Re-saving an existing step (a rerun into the same output_dir) first moves the old
    directory aside; if the process dies in that short window, ``find_checkpoint`` falls back
    to the newest finished checkpoint, and the old copy waits in ``.trash-*`` until the next save.
    """
    root = final.parent
    aside = None
    if final.exists():
        aside = layout.trash_path_for(root, final.name)
        remove_tree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(root)
    if aside is not None:
        remove_tree(aside)


def prune(root: Path, keep: int | None, *, protect: set[str]) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, never ``protect`` or ``latest``'s target.

    Each victim is first renamed to ``.trash-*`` (atomic) so a crash mid-delete never leaves a
    half-deleted directory that looks like a checkpoint.
    """
    if keep is None:
        return []
    protected = set(protect)
    latest = layout.read_latest_name(root)
    if latest:
        protected.add(latest)
    finished = layout.list_checkpoints(root)
    victims = [path for _, path in finished[:-keep] if path.name not in protected]
    for path in victims:
        trash = layout.trash_path_for(root, path.name)
        os.replace(path, trash)
        remove_tree(trash)
    if victims:
        fsync_dir(root)
    return victims
