"""Reading and writing ``torch.distributed.checkpoint`` (DCP) directories, safely.

DCP stores a state dict as per-rank ``__R_I.distcp`` files plus a ``.metadata`` index that maps
every key (and every shard of it) to a byte range. Two parts of stock DCP reading unpickle with
no restriction: ``FileSystemReader.read_metadata`` (``pickle.load`` of ``.metadata``) and
``DefaultLoadPlanner.load_bytes`` (``torch.load(weights_only=False)`` of non-tensor values).
A checkpoint downloaded from somewhere must never run code, so this module replaces both:

* ``SafeReader`` unpickles ``.metadata`` with an allow-list of the DCP metadata classes,
  ``torch.Size``, dtypes and layouts (anything else is refused, naming the file);
* ``SafePlanner`` loads non-tensor values with ``weights_only=True``.

Tensor payloads are already read with ``weights_only=True`` by DCP itself.

Writing goes through ``save`` (blocking) or ``BackgroundWrites`` (``dcp.async_save``: the state
is copied to host memory at once, the files are written by a thread while training goes on).

It also offers the checks a resume needs before it changes anything (every file a
checkpoint's metadata refers to exists and is long enough, digests match) and
``read_tensor``: one tensor at a time, with no process group, for ``checkpoint consolidate``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from automodel_cli.errors import UserError

METADATA_FILE = ".metadata"

_DCP_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
_DCP_CLASSES = {
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING", "_StorageInfo",
}
_PATH_CLASSES = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}
_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice", "complex"}


_DAMAGED_HINT = "Delete the checkpoint or resume from another one."


class DamagedCheckpoint(UserError):
    """A checkpoint file is missing, truncated or corrupted: the checkpoint cannot be used, but
    an older one may (``checkpoint.resume=auto`` falls back to it)."""


def damaged(path: Path, detail: str, hint: str | None = None) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"Checkpoint file {path} is corrupted or truncated ({detail}).", hint or _DAMAGED_HINT)


def missing(path: Path, hint: str | None = None) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"Checkpoint file {path} is missing; the checkpoint is incomplete.", hint or _DAMAGED_HINT)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata objects and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name in _DCP_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                       torch.memory_format)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        if module == "pathlib" and name in _PATH_CLASSES:
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load `{module}.{name}` from checkpoint metadata")


def read_metadata(directory: Path) -> Metadata:
    """The DCP index of ``directory``, unpickled with an allow-list; ``UserError`` naming the
    file when it is missing, damaged, or holds anything but DCP metadata."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise missing(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise damaged(path, f"{first_line(exc)}; it is never unpickled beyond DCP metadata") from None
    except Exception as exc:  # EOFError, struct errors, AttributeError from a mangled stream ...
        raise damaged(path, first_line(exc)) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise damaged(path, "it does not hold a DCP index")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from ``read_metadata`` (read once, cached)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_metadata(Path(self.path))
        return self._metadata


class SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(
                f"value `{read_item.dest_index.fqn}` holds objects that are never unpickled for "
                f"safety ({first_line(exc)})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
        yield


@contextmanager
def _disk_errors_surfaced(directory: Any) -> Iterator[None]:
    """Re-raise a disk error (``storage.storage_error``) hidden inside another exception as a
    plain ``OSError`` naming the file (or ``directory``): DCP sends each rank's failure to the
    others pickled, which drops ``__context__``, and ``torch.save`` reports a full disk as a
    ``RuntimeError`` whose context is the ``OSError``."""
    from automodel_cli.components.checkpoint.storage import storage_error

    try:
        yield
    except Exception as exc:
        disk = storage_error(exc)
        if disk is None or disk is exc and disk.filename:
            raise
        raise OSError(disk.errno, disk.strerror, disk.filename or str(directory)) from exc


class SafeWriter(FileSystemWriter):
    """``FileSystemWriter`` whose disk errors reach every rank with their errno."""

    def write_data(self, *args: Any, **kwargs: Any) -> Any:
        with _disk_errors_surfaced(self.path):
            return super().write_data(*args, **kwargs)

    def finish(self, *args: Any, **kwargs: Any) -> None:
        with _disk_errors_surfaced(self.path):
            return super().finish(*args, **kwargs)


def save(state: dict[str, Any], directory: Path, *, distributed: bool) -> None:
    """``dcp.save`` of ``state`` into ``directory`` (collective when ``distributed``)."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(state, storage_writer=SafeWriter(str(directory), sync_files=True), no_dist=not distributed)


class BackgroundWriteFailed(RuntimeError):
    """A background DCP write failed; the original failure is its ``__cause__`` (where
    ``storage.storage_error`` finds a full disk)."""


class BackgroundWrites:
    """DCP saves whose files are written by threads while the caller goes on (``dcp.async_save``).

    ``save`` copies the state to host memory before it returns (DCP's staging), so the caller may
    change its tensors at once (the next optimizer step); a thread then plans and writes the
    files. Under a process group each save's thread runs its collectives on a gloo group of its
    own (``collective.side_group``): the training's collectives on the default group, and two
    saves in flight at once, never interleave on one group. ``wait`` blocks until every file is
    written and raises ``BackgroundWriteFailed`` if any write failed.
    """

    def __init__(self) -> None:
        self._futures: list[Any] = []

    def save(self, state: dict[str, Any], directory: Path) -> None:
        """Collective under a process group: every rank calls it the same number of times."""
        import torch.distributed.checkpoint as dcp

        from automodel_cli.components.checkpoint import collective

        group = collective.side_group(len(self._futures))
        if group is None:  # one process: DCP warns from its thread, where _quiet cannot reach
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        self._futures.append(dcp.async_save(state, storage_writer=SafeWriter(str(directory), sync_files=True),
                                            process_group=group, no_dist=group is None))

    def wait_quietly(self) -> None:
        """Wait for every write to end, ignoring failures (before the caller discards them)."""
        import concurrent.futures

        concurrent.futures.wait(self._futures)

    def wait(self) -> None:
        # Every write ends first: a failed one must not let the caller remove the directory
        # while another thread still writes into it.
        self.wait_quietly()
        for future in self._futures:
            try:
                future.result()
            except BaseException as exc:  # DCP raises CheckpointException, a BaseException
                raise BackgroundWriteFailed(f"writing checkpoint shards failed ({checkpoint_error(exc)})") from exc


def load(state: dict[str, Any], directory: Path, *, distributed: bool,
         metadata: Metadata | None = None) -> None:
    """``dcp.load`` into ``state`` in place, reading safely (collective when ``distributed``).

    A failure while reading (DCP raises ``CheckpointException``, a ``BaseException``, on every
    rank) becomes a ``UserError`` naming the directory and the first rank's error.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeReader(directory, metadata), planner=SafePlanner(),
                     no_dist=not distributed)
    except CheckpointException as exc:
        raise UserError(
            f"Reading checkpoint directory {directory} failed ({checkpoint_error(exc)}).",
            "Delete the checkpoint or resume from another one.",
        ) from None


# ------------------------------------------------------------------------------ integrity
def referenced_files(metadata: Metadata) -> dict[str, int]:
    """relative file name -> the least size it must have (end of its last referenced byte)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed


def check_files(directory: Path, metadata: Metadata) -> None:
    """Every data file the index refers to exists and is long enough (cheap: ``stat`` only)."""
    for name, size in sorted(referenced_files(metadata).items()):
        path = Path(directory) / name
        if not path.is_file():
            raise missing(path)
        actual = path.stat().st_size
        if actual < size:
            raise damaged(path, f"{actual} bytes, but the index refers to {size}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_digests(root: Path, files: dict[str, dict[str, Any]], names: Iterable[str]) -> None:
    """Check size and sha256 of ``names`` (paths relative to ``root``) against ``files``."""
    for name in names:
        expected = files[name]
        path = root / name
        if not path.is_file():
            raise missing(path)
        size = path.stat().st_size
        if size != expected.get("size"):
            raise damaged(path, f"{size} bytes, expected {expected.get('size')}")
        if "sha256" in expected and sha256_file(path) != expected["sha256"]:
            raise damaged(path, "its sha256 digest does not match the one recorded at save time")


# ---------------------------------------------------------------------------- one tensor
@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def tensor_infos(metadata: Metadata) -> dict[str, TensorInfo]:
    """Global shape and dtype of every tensor in the index (non-tensor values are skipped)."""
    out = {}
    for name, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[name] = TensorInfo(name, tuple(int(d) for d in item.size), item.properties.dtype,
                                   len(item.chunks))
    return out


def byte_values(metadata: Metadata) -> list[str]:
    return [name for name, item in metadata.state_dict_metadata.items()
            if isinstance(item, BytesStorageMetadata)]


def read_tensor(directory: Path, info: TensorInfo, metadata: Metadata) -> torch.Tensor:
    """The whole tensor ``info.name``, assembled from all its shards, with no process group.

    Memory: the tensor plus one shard in flight, never the rest of the checkpoint.
    """
    out = torch.empty(info.shape, dtype=info.dtype)
    load({info.name: out}, directory, distributed=False, metadata=metadata)
    return out


def checkpoint_error(exc: BaseException) -> str:
    """The first underlying failure of a DCP ``CheckpointException`` (which wraps per-rank
    ``(exception, traceback)`` pairs)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner:
            inner = inner[0]
        if isinstance(inner, BaseException):
            return first_line(inner)
        return str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return first_line(exc)
