"""Find the checkpoint a run should resume from, and restore it.

Loading reads and checks everything it can before it changes anything (meta.json, the size
and sha256 of every file, the DCP indexes against the model and optimizer, scheduler, RNG and
train state), so a damaged or foreign checkpoint is reported, naming the file or tensor,
without leaving a half-restored model behind. Only then are the shards read into the model
and optimizer, resharded by DCP to however many ranks this run has.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint import collective, dcp_io, layout
from automodel_cli.components.checkpoint.rng import restore_rng_state
from automodel_cli.components.checkpoint.save import FORMAT_NAME, FORMAT_VERSION, file_owner
from automodel_cli.components.checkpoint.state import (
    check_model_matches,
    check_optimizer_matches,
    load_model_state,
    load_optimizer_state,
    optimizer_state,
    read_scheduler_state,
    safe_torch_load,
)
from automodel_cli.errors import UserError

log = logging.getLogger(__name__)

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


def _read_json(path: Path, missing_message: str) -> Any:
    """A checkpoint JSON file; missing, unreadable or truncated ones are ``UserError``s."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing_message, _RESUME_HINT) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Checkpoint file {path} is corrupted or truncated ({exc}).", _RESUME_HINT) from None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """Read and check ``meta.json``; a damaged or foreign one is a ``UserError``."""
    path = Path(checkpoint) / layout.META_FILE
    meta = _read_json(path, f"{checkpoint} is not a checkpoint: {path.name} is missing.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"Checkpoint file {path} is not an automodel checkpoint description.", _RESUME_HINT)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"Checkpoint {checkpoint} uses format version {version}, newer than this automodel-cli "
            f"understands ({FORMAT_VERSION}).",
            "Upgrade automodel-cli to resume from it.",
        )
    if version < FORMAT_VERSION:
        raise UserError(
            f"Checkpoint {checkpoint} uses format version {version} (single-file, written before "
            f"sharded checkpoints), which this automodel-cli no longer reads.",
            "Start fresh with checkpoint.resume=off, or use the run's final/ directory as model.path.",
        )
    if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("world_size"), int):
        raise UserError(f"Checkpoint file {path} is incomplete (no file list or world size).", _RESUME_HINT)
    return meta


def verify_files(checkpoint: Path, meta: dict[str, Any], *, digests: bool = True) -> None:
    """Collective: every file in meta.json exists with its recorded size and (``digests``)
    sha256. Each rank hashes a share of the files; any failure is raised on every rank."""
    files: dict[str, dict[str, Any]] = meta["files"]
    rank, world = collective.rank(), collective.world_size()

    def check() -> None:
        for name in sorted(files):  # sizes first: cheap, and names the truncated file
            path = checkpoint / name
            if not path.is_file():
                raise UserError(f"Checkpoint file {path} is missing; the checkpoint is incomplete.", _RESUME_HINT)
            if path.stat().st_size != files[name].get("size"):
                raise dcp_io.damaged(path, f"{path.stat().st_size} bytes, expected {files[name].get('size')}",
                                     _RESUME_HINT)
        if digests:
            mine = [n for n in sorted(files) if file_owner(n) % world == rank]
            dcp_io.verify_digests(checkpoint, files, mine)

    collective.run_agreed(check)


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / layout.TRAIN_STATE_FILE
    state = _read_json(path, f"Checkpoint file {path} is missing; the checkpoint is incomplete.")
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
    verify: bool = True,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states in place; return the train state.

    Collective: with a process group every rank calls it. ``model``/``optimizer``/``scheduler``
    must be built as in the saved run (same base weights, same PEFT config) but may be sharded
    over a different number of ranks; DCP reshards. ``generators`` are the recipe's own RNGs
    saved under the same names. Pass None for an optimizer or scheduler that should not be
    restored. ``verify`` checks every file's sha256 (each rank hashes a share) before anything
    is read; sizes are always checked.

    RNG states are exact when the world size matches the saved one; otherwise see
    ``automodel_cli.components.checkpoint.rng`` for what is restored.
    """
    path = Path(path)
    rank, world = collective.rank(), collective.world_size()
    meta = collective.run_agreed(lambda: read_meta(path))
    saved_world = int(meta["world_size"])
    verify_files(path, meta, digests=verify)

    # Read and check everything first ...
    def check() -> dict[str, Any]:
        found: dict[str, Any] = {}
        found["model_md"] = dcp_io.read_metadata(path / layout.MODEL_DIR)
        dcp_io.check_files(path / layout.MODEL_DIR, found["model_md"])
        check_model_matches(model, found["model_md"], path, saved_class=meta.get("model_class"))
        if optimizer is not None:
            found["optim_md"] = dcp_io.read_metadata(path / layout.OPTIMIZER_DIR)
            dcp_io.check_files(path / layout.OPTIMIZER_DIR, found["optim_md"])
        if scheduler is not None and layout.SCHEDULER_FILE in meta["files"]:
            found["scheduler"] = read_scheduler_state(path)
        own = rank if rank < saved_world else None
        found["rng"] = _read_rng(path, own) if own is not None else None
        found["rng0"] = found["rng"] if own == 0 else _read_rng(path, 0)
        missing = sorted(set(generators or {}) - set(found["rng0"].get("generators", {})))
        if missing:
            raise UserError(
                f"Checkpoint {path} has no state for the random generator(s) {', '.join(missing)}.",
                "It was probably saved by a different recipe; start fresh with checkpoint.resume=off.",
            )
        found["train_state"] = read_train_state(path)
        return found

    found = collective.run_agreed(check)

    template = None
    optimizer_was_fresh = optimizer is not None and not optimizer.state
    try:
        if optimizer is not None:
            template = optimizer_state(model, optimizer)  # initialises a fresh optimizer's state
            collective.run_agreed(lambda: check_optimizer_matches(template, found["optim_md"], path))

        # ... then change state.
        load_model_state(model, path, found["model_md"])
        if optimizer is not None:
            load_optimizer_state(model, optimizer, template, path, found["optim_md"])
    except BaseException:
        if optimizer_was_fresh:
            optimizer.state.clear()  # back to "never stepped", as before the call
        raise
    if "scheduler" in found:
        scheduler.load_state_dict(found["scheduler"])

    if saved_world != world and rank == 0:
        log.warning(
            "Checkpoint %s was saved by %d ranks and is resumed on %d: model and optimizer state "
            "are resharded exactly; random states cannot continue exactly (named generators come "
            "from rank 0, global RNGs from the same rank where it existed).", path, saved_world, world)
    source = f"checkpoint {path}"
    if saved_world == world:
        restore_rng_state(found["rng"], generators, source=source)
    else:
        if found["rng"] is not None:
            restore_rng_state(found["rng"], None, source=source)
        restore_rng_state(found["rng0"], generators, source=source, restore_globals=False)
    return found["train_state"]


def _read_rng(path: Path, rank: int) -> dict[str, Any]:
    file = path / layout.rng_file(rank)
    state = safe_torch_load(file)
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise UserError(f"Checkpoint file {file} does not hold RNG states.", _RESUME_HINT)
    return state
