"""Write safetensors files one tensor at a time.

The ``safetensors`` Python API takes a whole dict of tensors, i.e. the whole model in memory.
The format itself is simple enough to stream: an 8-byte little-endian header length, a JSON
header giving every tensor's dtype, shape and byte range, then the raw bytes in that order.
The header depends only on names, dtypes and shapes, so it is written first and each tensor's
bytes follow as soon as the tensor is produced; memory stays at one tensor.

Files above ``max_shard_bytes`` are split as ``save_pretrained`` does
(``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class StreamingWriter:
    """One safetensors file whose tensors are written in the order of ``entries``."""

    def __init__(self, path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for entry in self.entries:
            if entry.dtype not in DTYPE_CODES:
                raise ValueError(f"safetensors cannot store dtype {entry.dtype} (tensor `{entry.name}`)")
            header[entry.name] = {"dtype": DTYPE_CODES[entry.dtype], "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self._next]
        if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"expected `{entry.name}` {entry.dtype} {list(entry.shape)}, got `{name}` "
                             f"{tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            self._file.close()
            raise RuntimeError(f"{self.path}: closed before tensor `{missing}` was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int, prefix: str = "model") -> list[tuple[str, list[Entry]]]:
    """Split ``entries`` (in order) into files of at most ``max_shard_bytes`` (a single larger
    tensor gets a file of its own); names follow ``save_pretrained``."""
    groups: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not groups or (size + entry.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) <= 1:
        return [(f"{prefix}.safetensors", groups[0] if groups else [])]
    total = len(groups)
    return [(f"{prefix}-{i + 1:05d}-of-{total:05d}.safetensors", group) for i, group in enumerate(groups)]


def write_index(directory: Path, shards: Iterable[tuple[str, list[Entry]]], prefix: str = "model") -> None:
    shards = list(shards)
    if len(shards) <= 1:
        return
    index = {"metadata": {"total_size": sum(e.nbytes for _, group in shards for e in group)},
             "weight_map": {e.name: file for file, group in shards for e in group}}
    (Path(directory) / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
