"""The few collectives a multi-rank checkpoint needs, reduced to no-ops without a process group.

Saving and loading are SPMD: every rank calls the same function. Whatever one rank decides
alone (an error while writing its RNG file, a damaged file it was asked to verify) must reach
every rank, or the others wait forever at the next collective. ``agree`` is that exchange:
each rank contributes its outcome, and all of them raise if any failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from automodel_cli.components.checkpoint.storage import storage_error
from automodel_cli.errors import UserError

T = TypeVar("T")


def active() -> bool:
    """Whether a default process group is up (torchrun with init_process_group)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


_side_groups: list[Any] = []
_side_groups_of: Any = None  # the default group they were made for


def side_group(index: int) -> Any:
    """The ``index``-th extra gloo process group, for collectives that a background thread runs
    while the main thread runs its own on the default group (one group must never carry both:
    the ranks could order them differently). None without a process group.

    Collective the first time an index is asked for (every rank creates the group); later calls
    return the same group, until the default group is replaced.
    """
    global _side_groups_of
    if not active():
        return None
    if _side_groups_of is not dist.group.WORLD:
        _side_groups.clear()
        _side_groups_of = dist.group.WORLD
    while len(_side_groups) <= index:
        _side_groups.append(dist.new_group(backend="gloo"))
    return _side_groups[index]


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (a picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value`` (of ``group``, default all ranks), in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail when another rank did."""


def _describe(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, UserError):
        return ("user", exc.message, exc.hint)
    disk = storage_error(exc)
    if disk is not None:
        return ("disk", disk.errno, disk.strerror, disk.filename)
    return ("error", f"{type(exc).__name__}: {exc}")


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank passes an error.

    A rank that failed re-raises its own exception (keeping its traceback); the others raise
    the first failing rank's ``UserError`` as a ``UserError`` (so the CLI prints it the same way
    everywhere), its disk error (``storage.storage_error``: a full disk, a read-only directory)
    as an ``OSError`` with the same errno and file name (so every rank reports it alike), or a
    ``RankFailed`` naming the rank and its error.
    """
    if not active():
        if error is not None:
            raise error
        return
    outcomes = gather(None if error is None else _describe(error))
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if error is not None:
        raise error
    first_rank, (kind, *details) = failed[0]
    if kind == "user":
        raise UserError(*details)
    if kind == "disk":
        raise OSError(*details)
    raise RankFailed(f"rank {first_rank} failed: {details[0]}")


def run_agreed(fn: Callable[[], T]) -> T:
    """Run ``fn`` on this rank, then ``agree`` on its outcome (collective)."""
    try:
        result = fn()
    except Exception as exc:  # BaseException (KeyboardInterrupt, SIGKILL) ends the job anyway
        agree(exc)
        raise  # unreachable: agree re-raises
    agree(None)
    return result
