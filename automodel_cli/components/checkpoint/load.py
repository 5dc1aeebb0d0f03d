"""Find the checkpoint a run should resume from, and restore it.

Loading reads and checks every file before it changes anything, so a damaged checkpoint is
reported (naming the file) without leaving a half-restored model behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint import layout
from automodel_cli.components.checkpoint.rng import restore_rng_state
from automodel_cli.components.checkpoint.save import FORMAT_NAME, FORMAT_VERSION
from automodel_cli.components.checkpoint.state import (
    apply_model_state,
    apply_optimizer_state,
    check_model_matches,
    read_model_state,
    read_optimizer_state,
    read_scheduler_state,
    safe_torch_load,
)
from automodel_cli.errors import UserError

_OFF = {"off", "none", "no", "false", ""}
_AUTO = {"auto", "latest", "true", "yes"}
_RESUME_HINT = "Set checkpoint.resume to auto, off, or the path of a checkpoint or run directory."


def find_checkpoint(spec: str | Path | bool | None, run_dir: Path) -> Path | None:
    """Resolve ``checkpoint.resume`` to a checkpoint directory, or None to start fresh.

    ``"auto"``/True: the latest checkpoint in ``run_dir`` (None when there is none yet, so a
    first run and its restart share one config). ``"off"``/False/None: None. Anything else is
    a path (relative paths are tried from the working directory, then from ``run_dir``): a
    checkpoint directory, or a run or ``checkpoints`` directory meaning its latest checkpoint.
    """
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = "auto"
    if isinstance(spec, str) and spec.strip().lower() in _OFF:
        return None
    if isinstance(spec, str) and spec.strip().lower() in _AUTO:
        return layout.resolve_latest(layout.checkpoints_root(run_dir))
    if not isinstance(spec, (str, Path)):
        raise UserError(f"checkpoint.resume must be auto, off or a path, got {spec!r}.", _RESUME_HINT)

    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(run_dir) / path).exists():
        path = Path(run_dir) / path
    if not path.exists():
        raise UserError(f"checkpoint.resume: {path} does not exist.", _RESUME_HINT)
    if layout.is_checkpoint_dir(path):
        return path.resolve()
    for root in (layout.checkpoints_root(path), path):
        if root.is_dir() and ((root / layout.LATEST_FILE).exists() or layout.list_checkpoints(root)):
            found = layout.resolve_latest(root)
            if found is not None:
                return found.resolve()
            raise UserError(f"checkpoint.resume: {path} holds no finished checkpoint.", _RESUME_HINT)
    raise UserError(
        f"checkpoint.resume: {path} is not a checkpoint (no {layout.META_FILE}) and not a run "
        f"directory with a `{layout.CHECKPOINTS_DIR}/` folder.",
        _RESUME_HINT,
    )


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """Read and check ``meta.json``; a damaged or foreign one is a ``UserError``."""
    path = Path(checkpoint) / layout.META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{checkpoint} is not a checkpoint: {path.name} is missing.", _RESUME_HINT) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Checkpoint file {path} is corrupted or truncated ({exc}).", _RESUME_HINT) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"Checkpoint file {path} is not an automodel checkpoint description.", _RESUME_HINT)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"Checkpoint {checkpoint} uses format version {version}, newer than this automodel-cli "
            f"understands ({FORMAT_VERSION}).",
            "Upgrade automodel-cli to resume from it.",
        )
    return meta


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / layout.TRAIN_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Checkpoint file {path} is missing; the checkpoint is incomplete.", _RESUME_HINT) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Checkpoint file {path} is corrupted or truncated ({exc}).", _RESUME_HINT) from None
    if not isinstance(state, dict):
        raise UserError(f"Checkpoint file {path} does not hold a JSON object.", _RESUME_HINT)
    return state


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states in place; return the train state.

    ``model``/``optimizer``/``scheduler`` must be built exactly as in the saved run (same
    base weights, same PEFT config); ``generators`` are the recipe's own RNGs saved under the
    same names. Pass None for an optimizer or scheduler that should not be restored.
    """
    path = Path(path)
    meta = read_meta(path)
    files = set(meta.get("files", []))

    # Read and check everything first ...
    tensors = read_model_state(path)
    check_model_matches(model, tensors, path, saved_class=meta.get("model_class"))
    optimizer_state = read_optimizer_state(path) if optimizer is not None else None
    scheduler_state = None
    if scheduler is not None and layout.SCHEDULER_FILE in files:
        scheduler_state = read_scheduler_state(path)
    rng_state = safe_torch_load(path / layout.RNG_FILE)
    if not isinstance(rng_state, dict) or "torch" not in rng_state or "python" not in rng_state:
        raise UserError(f"Checkpoint file {path / layout.RNG_FILE} does not hold RNG states.", _RESUME_HINT)
    missing = sorted(set(generators or {}) - set(rng_state.get("generators", {})))
    if missing:
        raise UserError(
            f"Checkpoint {path} has no state for the random generator(s) {', '.join(missing)}.",
            "It was probably saved by a different recipe; start fresh with checkpoint.resume=off.",
        )
    train_state = read_train_state(path)

    # ... then change state.
    apply_model_state(model, tensors)
    if optimizer_state is not None:
        apply_optimizer_state(optimizer, optimizer_state, path)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    restore_rng_state(rng_state, generators, source=f"checkpoint {path}")
    return train_state
