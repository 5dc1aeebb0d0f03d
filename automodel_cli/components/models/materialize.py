"""Build a model with no memory, parallelize it, then fill each process's shards.

A model is created on the meta device from its config (parameters only: buffers such as rotary
``inv_freq`` are computed for real, they are small), adapters and the tensor-parallel plan and
FSDP2 are applied while it is still empty, and only then is every parameter allocated: each
process allocates its own shard (``DTensor`` local tensor, or the whole tensor on one process)
and fills it

* from the Hugging Face safetensors files, reading only the rows of the slice it owns
  (``CheckpointReader``: positioned reads, no memory map, so the file's pages never count as
  the process's memory), cast to the training dtype tensor by tensor -- no process ever holds
  the full model, and one process never holds a full-precision copy before the cast; or
* for a random start (``model.from_scratch``), with the model's own initialisation
  (``_init_weights``) of the parameter's module, seeded by the parameter's name, so the weights
  are the same whatever the mesh (a run on 2 processes and one on 4 start alike);

QLoRA's quantized layers (``components/peft/quantize.py``) are left out of that allocation (a
weight FSDP2 shards allocates only its quantized rows): each of their weights is read whole,
quantized on the device and stored (cut to this process's rows) before the next is read. Then
LoRA/DoRA adapter weights are initialised the same way (A: Kaiming-uniform seeded by name,
B: zeros, DoRA magnitudes: the row norms of the loaded base weight). Tied weights are one
parameter and are filled once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Module-name parts that wrappers insert into parameter names (activation checkpointing,
#: torch.compile, FSDP1): they are not part of the checkpoint's keys.
_WRAPPERS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)(?=\.|$)")
#: Adapter parameters peft adds (initialised here, not read from the checkpoint).
_ADAPTER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)\.")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers are
    created for real, on the CPU, as their modules compute them."""
    original = torch.nn.Module.register_parameter

    def register_parameter(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def checkpoint_key(name: str) -> str:
    """The Hugging Face checkpoint key of a (possibly wrapped) model's parameter name."""
    name = _WRAPPERS.sub(r"\1", name).strip(".").replace("..", ".")
    if name.startswith("base_model.model."):  # a peft model
        name = name[len("base_model.model."):]
    name = re.sub(r"\.(modules_to_save\.[^.]+|original_module)\.", ".", name)  # peft's trained copy of a head
    return re.sub(r"(\.base_layer)+\.", ".", name)  # nested wrappers (peft's parameter adapters) too


def is_adapter(name: str) -> bool:
    return _ADAPTER.search(f".{name}.") is not None


def name_seed(seed: int, name: str) -> int:
    """A seed for one parameter: the run's seed and the parameter's name, whatever the mesh."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------- shards
def local_part(param: Any) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this process's tensor, the global shape, the offset of this process's part in it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        assert tuple(local.shape) == tuple(shape), (param.shape, shape, local.shape)
        return local, tuple(param.shape), tuple(offset)
    return param.data, tuple(param.shape), (0,) * param.dim()


def slice_of(full: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def fill(param: Any, source: Callable[[tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]) -> None:
    """Copy ``source(global_shape, offset, local_shape)`` into this process's part of ``param``."""
    local, shape, offset = local_part(param)
    if local.numel() == 0:
        return
    with torch.no_grad():
        local.copy_(source(shape, offset, tuple(local.shape)))


# ------------------------------------------------------------------------ materialising
def materialize(model: torch.nn.Module, device: Any, *, read: Callable[[str, tuple, tuple], torch.Tensor] | None,
                init: Callable[[str], torch.Tensor] | None, adapter_seed: int) -> None:
    """Allocate ``model``'s parameters on ``device`` (each process its own shards) and fill them:
    base weights with ``read(key, offset, shape)`` (a checkpoint slice) or, when ``read`` is
    None, with ``init(key)`` (the full tensor of one parameter); adapters seeded by name.
    Buffers keep the values they were built with."""
    from automodel_cli.components.models.structure import retie, shared_parameters

    from automodel_cli.components.peft.quantize import pending_layers

    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    shared = shared_parameters(model)
    from torch.distributed.tensor import DTensor

    quantized = pending_layers(model)  # QLoRA: never allocated at full precision all at once
    for layer in quantized.values():
        if not isinstance(layer.weight, DTensor):  # FSDP2 keeps its sharded parameter: to_empty fills it
            del layer._parameters["weight"]
    model.to_empty(device=device)
    retie(model, shared)  # to_empty replaces tied parameters one by one
    for name, layer in quantized.items():  # one full-precision weight at a time, quantized at once
        key = checkpoint_key(f"{name}.weight")
        shape = (layer.out_features, layer.in_features)
        full = read(key, (0, 0), shape) if read is not None else init(key)
        layer.store(full.to(device=device, dtype=layer.compute_dtype))
        del full
    stored = {id(layer.weight) for layer in quantized.values()}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name].to(buffer.device, buffer.dtype))
    adapters = []
    for name, param in model.named_parameters():
        if is_adapter(name):
            adapters.append((name, param))
            continue
        if id(param) in stored:
            continue
        key = checkpoint_key(name)
        dtype = param.dtype
        if read is not None:
            fill(param, lambda shape, offset, local, key=key, dtype=dtype: read(key, offset, local).to(dtype))
        else:
            full = init(key)
            fill(param, lambda shape, offset, local, full=full, dtype=dtype: slice_of(full, offset, local).to(dtype))
            del full
    for name, param in adapters:
        init_adapter(model, name, param, adapter_seed)


def init_adapter(model: torch.nn.Module, name: str, param: Any, seed: int) -> None:
    """LoRA A: Kaiming-uniform (a=sqrt(5), as peft), seeded by the parameter's name; B: zeros;
    DoRA magnitude: the row norms of the (loaded) base weight, as peft computes them at init."""
    key = checkpoint_key(name)
    if ".lora_B." in f".{name}." or ".lora_embedding_A." in f".{name}.":
        fill(param, lambda shape, offset, local: torch.zeros(local, dtype=param.dtype))
    elif ".lora_A." in f".{name}." or ".lora_embedding_B." in f".{name}.":
        generator = torch.Generator().manual_seed(name_seed(seed, key))
        full = torch.empty(tuple(param.shape), dtype=torch.float32)
        if ".lora_A." in f".{name}.":
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        else:
            torch.nn.init.normal_(full, generator=generator)
        fill(param, lambda shape, offset, local: slice_of(full, offset, local).to(param.dtype))
    elif ".lora_magnitude_vector." in f".{name}.":
        layer_name = name.split(".lora_magnitude_vector.")[0]
        weight = model.get_submodule(layer_name).get_base_layer().weight
        full_weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        norms = torch.linalg.norm(full_weight.float(), dim=1)
        fill(param, lambda shape, offset, local: slice_of(norms, offset, local).to(param.dtype))
    else:  # pragma: no cover - _ADAPTER lists the kinds above
        raise ValueError(f"no initialisation for adapter parameter {name}")


# ------------------------------------------------------------------ random initialisation
class SeededInit:
    """Full tensors of one parameter at a time, initialised by the model's own ``_init_weights``
    on a fresh full-size copy of the parameter's module, seeded by the module's name."""

    def __init__(self, reference: torch.nn.Module, seed: int):
        self.reference = reference  # the unwrapped model, built on meta (no memory)
        self.seed = seed
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    def __call__(self, key: str) -> torch.Tensor:
        module_name, _, param_name = key.rpartition(".")
        if self._cache is None or self._cache[0] != module_name:
            self._cache = (module_name, self._init_module(module_name))
        return self._cache[1][param_name]

    def _init_module(self, module_name: str) -> dict[str, torch.Tensor]:
        module = self.reference.get_submodule(module_name) if module_name else self.reference
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(name_seed(self.seed, module_name))
            module.to_empty(device="cpu", recurse=False)
            init_weights = getattr(self.reference, "_init_weights", None)
            if init_weights is not None:
                init_weights(module)
            else:  # a plain torch module: its own reset
                reset = getattr(module, "reset_parameters", None)
                if reset is not None:
                    reset()
            values = {name: p.detach().clone() for name, p in module.named_parameters(recurse=False)}
        finally:
            torch.random.set_rng_state(state)
            module.to("meta")
        return values


# --------------------------------------------------------------------- checkpoint reading
#: safetensors dtype codes -> torch dtype names.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "U16": "uint16", "U32": "uint32", "U64": "uint64",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class CheckpointReader:
    """Slices of tensors from a Hugging Face safetensors checkpoint (one file, or the shards an
    index lists), read with positioned reads straight from the files: only the rows a slice
    covers leave the disk, and nothing is memory-mapped, so the pages read are page cache (the
    kernel's, shared, reclaimable), not this process's resident memory. The format is
    safetensors' own: an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the data."""

    def __init__(self, files: list[Any]):
        import json
        import os

        self._fds: dict[str, int] = {}
        self.where: dict[str, Any] = {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for path in files:
            fd = os.open(str(path), os.O_RDONLY)
            self._fds[str(path)] = fd
            length = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, length, 8))
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
                self._entries[key] = (dtype, tuple(entry["shape"]), 8 + length + entry["data_offsets"][0])
                self.where[key] = path

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The slice of ``key`` at ``offset`` of size ``shape``: the rows of dimension 0 it
        covers are read in one go, then cut along the other dimensions."""
        dtype, full, start = self._entries[key]
        if not full:
            return self._read(key, start, (), dtype)
        row = math.prod(full[1:]) * torch.empty((), dtype=dtype).element_size()
        rows = self._read(key, start + offset[0] * row, (shape[0], *full[1:]), dtype)
        return rows[(slice(None), *(slice(o, o + s) for o, s in zip(offset[1:], shape[1:])))]

    def _read(self, key: str, position: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import os

        out = torch.empty(shape, dtype=dtype)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        fd, done = self._fds[str(self.where[key])], 0
        while done < len(buffer):
            count = os.preadv(fd, [buffer[done:]], position + done)
            if count <= 0:
                raise OSError(f"{self.where[key]} ends inside tensor {key}")
            done += count
        return out


def saved_names(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """Model key -> the name ``save_pretrained`` gives it, where the model's weight conversions
    rename it (a VLM's modules are ``model.language_model.layers.*`` and ``model.visual.*``; its
    checkpoints, written in the original format, say ``model.layers.*`` and ``visual.*``).
    Conversions that join several tensors into one have no per-key name and are left out (a
    mixture of experts' fused experts, saved one tensor per expert). Each key is reverted as a
    meta tensor of its parameter's shape, which conversions that split a tensor need."""
    from automodel_cli.components.models.hf_stream import reverted

    shapes = {checkpoint_key(name): tuple(param.shape) for name, param in model.named_parameters()}
    names = {}
    for key in keys:
        # A meta tensor of the parameter's shape: conversions that split it need its dimensions.
        out = list(reverted(model, {key: torch.empty(shapes.get(key, (0,)), device="meta")}))
        if len(out) == 1 and out[0] != key:
            names[key] = out[0]
    return names


def key_mapping(expected: list[str], available: set[str], prefix: str,
                saved: dict[str, str] | None = None,
                joined: Callable[[str], Any] | None = None) -> dict[str, Any] | None:
    """Model key -> checkpoint key, allowing for the base-model prefix (a checkpoint saved from
    the base model lacks ``model.``, one saved from a wrapper has it twice) and for the names the
    model's own weight conversions give its keys on save (``saved``, from ``saved_names``: both
    the module names and the saved names load, as with ``from_pretrained``); a key the
    checkpoint holds as several tensors maps to ``joined(key)`` (a ``joined.Joined``: a mixture
    of experts' per-expert weights) when all of them are there. None when some expected key has
    no match (the checkpoint is not this architecture's)."""
    mapping: dict[str, Any] = {}
    saved = saved or {}
    for key in expected:
        candidates = [key]
        if prefix and key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{key}")
        if key in saved:
            candidates.append(saved[key])
        match = next((c for c in candidates if c in available), None)
        if match is None and joined is not None:
            layout = joined(key)
            match = layout if layout is not None and all(k in available for k in layout.keys()) else None
        if match is None:
            return None
        mapping[key] = match
    return mapping


def read_mapped(reader: CheckpointReader, source: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A slice of the tensor ``source`` names in ``key_mapping``'s result: one checkpoint tensor,
    or several joined (``joined.Joined``)."""
    if isinstance(source, str):
        return reader.read(source, offset, shape)
    return source.read(reader, offset, shape)
