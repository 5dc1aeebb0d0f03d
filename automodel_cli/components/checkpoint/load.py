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
from collections.abc import Callable
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
    tied_aliases,
)
from automodel_cli.errors import UserError

log = logging.getLogger(__name__)

_OFF = {"off", "none", "no", "false", ""}
_AUTO = {"auto", "latest", "true", "yes"}
_RESUME_HINT = "Set checkpoint.resume to auto, off, or the path of a checkpoint or run directory."
_DAMAGED_HINT = ("Resume from another checkpoint (checkpoint.resume=PATH, or checkpoint.resume=auto for the newest "
                 "intact one of a run directory), or delete this one.")


def resume_is_auto(spec: str | Path | bool | None) -> bool:
    """``checkpoint.resume`` asks for the run's newest checkpoint (``auto``, ``latest``, true)."""
    return spec is True or isinstance(spec, str) and spec.strip().lower() in _AUTO


def find_checkpoint(spec: str | Path | bool | None, run_dir: Path) -> Path | None:
    """Resolve ``checkpoint.resume`` to a checkpoint directory, or None to start fresh.

    ``"auto"``/True: the latest checkpoint in ``run_dir`` (None when there is none yet, so a
    first run and its restart share one config). ``"off"``/False/None: None. Anything else is
    a path (relative paths are tried from the working directory, then from ``run_dir``): a
    checkpoint directory, or a run or ``checkpoints`` directory meaning its latest checkpoint.
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, str) and spec.strip().lower() in _OFF:
        return None
    if resume_is_auto(spec):
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
        raise dcp_io.damaged(path, str(exc), _DAMAGED_HINT) from None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """Read and check ``meta.json``; a damaged or foreign one is a ``UserError``."""
    path = Path(checkpoint) / layout.META_FILE
    meta = _read_json(path, f"{checkpoint} is not a checkpoint: {path.name} is missing.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise dcp_io.DamagedCheckpoint(f"Checkpoint file {path} is not an automodel checkpoint description.",
                                       _DAMAGED_HINT)
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
        raise dcp_io.DamagedCheckpoint(f"Checkpoint file {path} is incomplete (no file list or world size).",
                                       _DAMAGED_HINT)
    return meta


def _check_files(checkpoint: Path, meta: dict[str, Any], *, digests: bool) -> None:
    """This rank's share of ``verify_files``: every size, and the digests of its own files."""
    files: dict[str, dict[str, Any]] = meta["files"]
    rank, world = collective.rank(), collective.world_size()
    for name in sorted(files):  # sizes first: cheap, and names the truncated file
        path = checkpoint / name
        if not path.is_file():
            raise dcp_io.missing(path, _DAMAGED_HINT)
        if path.stat().st_size != files[name].get("size"):
            raise dcp_io.damaged(path, f"{path.stat().st_size} bytes, expected {files[name].get('size')}",
                                 _DAMAGED_HINT)
    if digests:
        mine = [n for n in sorted(files) if file_owner(n) % world == rank]
        dcp_io.verify_digests(checkpoint, files, mine)


def verify_files(checkpoint: Path, meta: dict[str, Any], *, digests: bool = True) -> None:
    """Collective: every file in meta.json exists with its recorded size and (``digests``)
    sha256. Each rank hashes a share of the files; any failure is raised on every rank."""
    collective.run_agreed(lambda: _check_files(checkpoint, meta, digests=digests))


def damage(checkpoint: Path, *, digests: bool = True) -> str | None:
    """Collective: what is damaged in ``checkpoint`` (meta.json, a missing or truncated file, a
    digest that does not match, on any rank), or None when it is intact. The same answer on
    every rank; problems that are not damage (a newer format) are raised on every rank."""
    def mine() -> str | None:
        try:
            _check_files(checkpoint, read_meta(checkpoint), digests=digests)
        except dcp_io.DamagedCheckpoint as error:
            return error.message.rstrip(".")
        return None

    return next((problem for problem in collective.gather(collective.run_agreed(mine)) if problem), None)


def _resume_candidates(root: Path) -> list[Path]:
    """What ``checkpoint.resume=auto`` may use, best first: ``latest``'s checkpoint, then the
    older finished ones, newest first."""
    first = layout.resolve_latest(root)
    if first is None:
        return []
    first_step = layout.parse_step(first.name)
    older = [path for step, path in reversed(layout.list_checkpoints(root)) if step < first_step]
    return [first, *older]


def find_intact_checkpoint(run_dir: Path, *, digests: bool = True,
                           note: Callable[[str], None] | None = None) -> Path | None:
    """Collective: the checkpoint ``checkpoint.resume=auto`` resumes from: ``latest``'s, or when
    that one is damaged the newest older one that is intact (sizes, and sha256 with
    ``digests``). Skipping is reported in one line through ``note`` (rank 0's printer; default:
    a warning on rank 0). None when the run has no checkpoint; a ``UserError`` when it has only
    damaged ones."""
    root = layout.checkpoints_root(run_dir)
    skipped: list[str] = []
    for path in _resume_candidates(root):
        problem = damage(path, digests=digests)
        if problem is None:
            if skipped:
                line = (f"checkpoint.resume=auto: {'; '.join(skipped)}; resuming from {path.name}, the newest "
                        f"intact checkpoint")
                if note is not None:
                    note(line)
                elif collective.rank() == 0:
                    log.warning(line)
            return path.resolve()
        skipped.append(f"{path.name} is damaged ({problem})")
    if skipped:
        raise UserError(
            f"checkpoint.resume=auto found no intact checkpoint in {root}: {'; '.join(skipped)}.",
            "Move the damaged checkpoints out of the way (or delete them), and the same command trains this "
            "run again from step 0; or start a new run in another --output-dir.",
        )
    return None


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
            collective.run_agreed(lambda: check_optimizer_matches(template, found["optim_md"], path,
                                                                  tied_aliases(model)))

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
        raise dcp_io.DamagedCheckpoint(f"Checkpoint file {file} does not hold RNG states.", _DAMAGED_HINT)
    return state
