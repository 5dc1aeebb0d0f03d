"""Write a resumable checkpoint so that a crash at any moment leaves the previous one intact.

The sequence, each step durable before the next (every rank calls ``save_checkpoint``):

1. rank 0 removes scratch left by dead processes (``.tmp-*``, ``.trash-*``) and creates
   ``checkpoints/.tmp-step_XXXXXXXX-PID/``; its name is broadcast; barrier;
2. every rank writes its shards (``dcp.save`` of model and optimizer state into ``model/``
   and ``optim/``) and its RNG state (``rng/rank_R.pt``); rank 0 adds the scheduler state,
   ``train_state.json`` and ``hf/``; barrier;
3. every rank hashes the files it wrote; rank 0 writes ``meta.json`` (last: its presence
   marks a finished checkpoint) and publishes the directory with one ``os.replace`` to
   ``step_XXXXXXXX``, fsyncing ``checkpoints/``; barrier;
4. rank 0 points ``latest`` at it (temp file + ``os.replace``) and prunes old checkpoints by
   renaming them to ``.trash-*`` first, then deleting; barrier.

In the background mode (``start_checkpoint(..., background=True)``, ``checkpoint.async``) step 2
copies the model and optimizer shards to host memory (DCP's async save) and returns; threads
write them and hash every rank's files while training goes on, and ``PendingCheckpoint.finish``
does step 3 and 4 later, from the main thread at a point every rank reaches (the training loop
calls it once every rank's writes are done, before the next save, and at the end of the loop).

Until step 3 nothing visible changed; between 3 and 4 ``latest`` still names the previous
checkpoint, which is whole; pruning never touches the new checkpoint or ``latest``'s target.
An error on any rank is raised on every rank (``collective.agree``), so no rank waits forever.
A write that fails because of the disk (full, over quota, read-only, not writable) is a
``UserError`` on every rank naming the intact previous checkpoint (``storage.py``).
Without a process group the same code runs as a single rank.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint import collective, dcp_io, hf_files, layout, storage
from automodel_cli.components.checkpoint.fsio import fsync_dir, remove_tree, write_bytes_durably
from automodel_cli.components.checkpoint.rng import capture_rng_state
from automodel_cli.components.checkpoint.state import (
    save_model_state,
    save_optimizer_state,
    save_scheduler_state,
    save_torch,
    signature_checksum,
    tied_aliases,
    trainable_names,
)
from automodel_cli.components.models.structure import unwrap
from automodel_cli.errors import UserError

#: Bump when the directory layout or a file format changes incompatibly.
#: 1: single-process model.safetensors/optimizer.pt; 2: DCP model/ and optim/, per-rank RNG.
FORMAT_VERSION = 2
FORMAT_NAME = "automodel-checkpoint"

_OWNED_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")


def save_checkpoint(run_dir: Path, step: int, **options: Any) -> Path:
    """Save ``run_dir/checkpoints/step_{step:08d}/`` atomically, blocking until it is published,
    and return its path: ``start_checkpoint(run_dir, step, **options).finish()`` (options as
    there, without ``background``)."""
    return start_checkpoint(run_dir, step, **options).finish()


def start_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    train_state: dict[str, Any],
    keep: int | None,
    generators: dict[str, torch.Generator] | None = None,
    tokenizer: Any = None,
    extra_files: Mapping[str, bytes | str] | None = None,
    background: bool = False,
) -> PendingCheckpoint:
    """Steps 1 and 2 of the sequence: the temporary directory and every file in it; ``finish()``
    on the result publishes it (steps 3 and 4) as ``run_dir/checkpoints/step_{step:08d}/``.

    Collective: with a process group every rank must call it with the same arguments
    (``model``/``optimizer`` being each rank's shard of them). ``train_state`` must be
    JSON-serialisable (step, epoch, samples consumed, seeds...); the step is always recorded
    in it. ``generators`` are extra RNGs the recipe owns (e.g. the data-order generator),
    restored by name by ``load_checkpoint``. ``keep`` is how many checkpoints to retain (None
    keeps all).

    The model's HF ``config.json`` and generation config (and a peft model's
    ``adapter_config.json``) are stored in ``hf/`` automatically; pass ``tokenizer`` (anything
    with ``save_pretrained``) to store it too, and ``extra_files`` (relative name -> content)
    for anything else ``checkpoint consolidate`` should copy into the exported model.

    With ``background`` the model and optimizer shards are copied to host memory now (DCP's
    async save) and written, then hashed, by threads, so the caller can train on meanwhile; the
    small files (RNG, scheduler, train state, ``hf/``) are written before it returns. The
    checkpoint stays invisible until ``finish``, which waits for the writes: a crash before
    then leaves the previous checkpoint in charge.
    """
    if keep is not None and keep < 1:
        raise UserError(f"checkpoint.keep must be at least 1, got {keep}.",
                        "Use 1 to keep only the newest checkpoint.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    state_json = _train_state_json(train_state, step)  # fail before touching the disk
    pending = PendingCheckpoint(Path(run_dir), step, keep, model, optimizer)
    root, is_main = pending.final.parent, collective.rank() == 0

    def prepare() -> str | None:
        if not is_main:
            return None
        root.mkdir(parents=True, exist_ok=True)
        layout.clean_scratch(root)
        tmp = layout.temp_dir_for(root, step)
        remove_tree(tmp)
        tmp.mkdir()
        return str(tmp)

    try:
        pending.tmp = Path(collective.broadcast(collective.run_agreed(prepare)))
        try:
            pending.saved, pending.writes = write_files(
                pending.tmp, step, model=model, optimizer=optimizer, scheduler=scheduler, state_json=state_json,
                generators=generators, tokenizer=tokenizer, extra_files=extra_files, background=background)
        except BaseException:
            pending.discard()
            raise
    except BaseException as exc:  # every rank gets here together (DCP raises a BaseException)
        raise pending.failure(exc, published=False) from None
    return pending


class PendingCheckpoint:
    """A checkpoint whose files are being written into its temporary directory (from
    ``start_checkpoint``); ``finish`` publishes it. ``writes`` resolves to the digests of the
    files this rank wrote once they are all on disk (at once for a blocking save)."""

    def __init__(self, run_dir: Path, step: int, keep: int | None, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None) -> None:
        self.run_dir = run_dir
        self.step = step
        self.keep = keep
        self.final = layout.checkpoints_root(run_dir) / layout.step_dir_name(step)
        self.tmp: Path | None = None
        self.saved: dict[str, Any] = {}  # parameter signature and mesh, for meta.json
        self.writes: Future | None = None
        self._model, self._optimizer = model, optimizer

    def done(self) -> bool:
        """This rank's writes are finished (successfully or not)."""
        return self.writes is None or self.writes.done()

    def ready(self) -> bool:
        """Every rank's writes are finished, so ``finish`` will not wait (collective)."""
        return all(collective.gather(self.done()))

    def finish(self) -> Path:
        """Wait for the writes, then hash, write ``meta.json``, publish, point ``latest`` at the
        checkpoint and prune (steps 3 and 4; collective). A failed write, here or in the
        background, removes the temporary directory and raises on every rank: a disk error as
        the ``UserError`` naming the intact previous checkpoint."""
        is_main = collective.rank() == 0
        published = False
        try:
            try:
                seal(self.tmp, self.step, self._model, self.saved, self.writes)
                collective.run_agreed(lambda: publish(self.tmp, self.final) if is_main else None)
            except BaseException:
                self.discard()
                raise
            published = True
            collective.run_agreed(self._point_and_prune if is_main else lambda: None)
        except BaseException as exc:
            raise self.failure(exc, published=published) from None
        return self.final

    def _point_and_prune(self) -> None:
        root = self.final.parent
        layout.write_latest(root, self.final.name)
        prune(root, self.keep, protect={self.final.name})

    def discard(self) -> None:
        """Remove the temporary directory (rank 0, best effort; a SIGKILL leaves it for the
        next save to clean)."""
        if collective.rank() == 0 and self.tmp is not None:
            remove_tree(self.tmp)

    def failure(self, exc: BaseException, *, published: bool) -> BaseException:
        """The error to raise for ``exc``: a ``UserError`` when the disk refused a write, else
        ``exc`` itself."""
        error = storage.storage_error(exc)
        if error is None:
            return exc
        root = self.final.parent
        previous = layout.resolve_latest(root)  # what checkpoint.resume=auto would use now
        needed = storage.checkpoint_bytes(previous) or state_bytes(self._model, self._optimizer)
        return storage.checkpoint_write_failed(error, run_dir=self.run_dir, step_name=self.final.name,
                                               previous=previous, needed=needed, published=published)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the trainable parameters and the optimizer's tensors (global sizes for sharded
    ones): about what a checkpoint holds, for messages when there is no checkpoint to measure."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def _train_state_json(train_state: dict[str, Any], step: int) -> str:
    try:
        return json.dumps({**train_state, "step": step}, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"train_state must be JSON-serialisable: {exc}") from exc


def file_owner(relative: str) -> int:
    """Which saved rank wrote (and hashes) a checkpoint file: DCP shard ``__R_I.distcp`` ->
    R, RNG file ``rng/rank_R.pt`` -> R, everything else rank 0."""
    name = Path(relative).name
    match = _OWNED_SHARD.match(name)
    if match:
        return int(match.group(1))
    if relative.startswith(f"{layout.RNG_DIR}/rank_") and name.endswith(".pt"):
        return int(name.removeprefix("rank_").removesuffix(".pt"))
    return 0


def _list_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def write_payload(directory: Path, step: int, *, model, optimizer, scheduler, state_json: str,
                  generators: dict[str, torch.Generator] | None, tokenizer: Any = None,
                  extra_files: Mapping[str, bytes | str] | None = None) -> None:
    """Write every file of a checkpoint into ``directory``; ``meta.json`` goes last (collective)."""
    saved, digests = write_files(directory, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 state_json=state_json, generators=generators, tokenizer=tokenizer,
                                 extra_files=extra_files)
    seal(directory, step, model, saved, digests)


def write_files(directory: Path, step: int, *, model, optimizer, scheduler, state_json: str,
                generators: dict[str, torch.Generator] | None, tokenizer: Any = None,
                extra_files: Mapping[str, bytes | str] | None = None,
                background: bool = False) -> tuple[dict[str, Any], Future]:
    """Write every file of a checkpoint but ``meta.json`` into ``directory`` (collective).

    Returns the parameter signature and mesh (for ``write_meta``) and a future of the digests
    of the files this rank owns (``file_owner``): resolved already, or with ``background``
    once the threads writing the shards are done and the files are hashed.
    """
    rank, world = collective.rank(), collective.world_size()

    def write_local() -> None:
        rng_path = directory / layout.rng_file(rank)
        rng_path.parent.mkdir(exist_ok=True)
        save_torch(capture_rng_state(generators), rng_path)
        if rank != 0:
            return
        if scheduler is not None:
            save_scheduler_state(scheduler, directory)
        write_bytes_durably(directory / layout.TRAIN_STATE_FILE, state_json.encode("utf-8"))
        payload = hf_files.hf_payload(model, tokenizer, extra_files)
        for name, content in payload.items():
            target = directory / layout.HF_DIR / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_durably(target, content)

    # The small files first: once threads write the shards, only they can fail in the background.
    collective.run_agreed(write_local)
    shards = dcp_io.BackgroundWrites() if background else None
    writer = (shards,) if shards else ()  # blocking: the state I/O functions' plain signature
    try:
        saved = save_model_state(model, directory, *writer)
        if optimizer is not None:
            save_optimizer_state(model, optimizer, directory, *writer)
    except BaseException:
        if shards:  # let a thread already writing end before the caller removes its directory
            shards.wait_quietly()
        raise

    def hash_mine() -> dict[str, dict[str, Any]]:
        if shards:
            shards.wait()
        return _hash_owned(directory, rank, world)

    if shards:
        return saved, _in_background(hash_mine)
    digests: Future = Future()
    try:
        digests.set_result(hash_mine())
    except Exception as exc:  # raised on every rank by finish (collective.run_agreed)
        digests.set_exception(exc)
    return saved, digests


def _hash_owned(directory: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files of ``directory`` that ``rank`` wrote (``file_owner``)."""
    mine = {}
    for name in _list_files(directory):
        if file_owner(name) % world == rank:
            path = directory / name
            mine[name] = {"size": path.stat().st_size, "sha256": dcp_io.sha256_file(path)}
    return mine


def _in_background(fn: Any) -> Future:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writes")
    try:
        return executor.submit(fn)
    finally:
        executor.shutdown(wait=False)


def seal(directory: Path, step: int, model: torch.nn.Module, saved: dict[str, Any], writes: Future) -> None:
    """Wait for every rank's writes (``write_files``), gather their digests and write
    ``meta.json`` on rank 0 (collective; a failed write on any rank raises on all)."""
    digests: dict[str, dict[str, Any]] = {}
    for part in collective.gather(collective.run_agreed(writes.result)):
        digests.update(part)
    collective.run_agreed(lambda: write_meta(directory, step, model, saved, digests)
                          if collective.rank() == 0 else None)


def write_meta(directory: Path, step: int, model: torch.nn.Module, saved: dict[str, Any],
               digests: dict[str, dict[str, Any]]) -> None:
    """``meta.json`` (rank 0, last: its presence marks a finished checkpoint), then fsync the
    directories, so the publishing rename is durable."""
    trainable = set(trainable_names(model))
    every = {n for n, _ in model.named_parameters()}
    adapter = hf_files.adapter_info(model)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "hf_architecture": hf_files.hf_class_name(unwrap(model)),
        "world_size": collective.world_size(),
        "mesh": saved["mesh"],
        "trainable_only": len(trainable) < len(every),
        "peft": None if adapter is None else {k: v for k, v in adapter.items() if k != "config"},
        "tied": {**tied_aliases(model), **saved.get("tied", {})},
        "params_sha256": signature_checksum(saved["params"]),
        "params": saved["params"],
        "files": dict(sorted(digests.items())),
    }
    write_bytes_durably(directory / layout.META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
    for sub in {directory / Path(name).parent for name in digests} | {directory}:
        fsync_dir(sub)


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
