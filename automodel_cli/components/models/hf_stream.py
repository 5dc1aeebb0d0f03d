"""Write a (sharded) model as a Hugging Face directory one tensor at a time.

``save_pretrained`` needs the whole state dict, so a model sharded over many ranks would first be
gathered whole on rank 0. Here every rank gathers one tensor (``DTensor.full_tensor``, in the
same order everywhere), rank 0 appends it to the safetensors file it belongs in
(``safetensors_stream``: the header is computed up front from names, dtypes and shapes), and
the tensor is dropped before the next one is gathered: rank 0 holds about one tensor, never the
model.

The files are those ``save_pretrained`` writes, decided by Hugging Face's own rules: the same
keys (the model's canonical names; a tied weight once, the name ``save_pretrained`` keeps; keys
in ``_keys_to_ignore_on_save`` left out; the model's weight conversions reverted to the
checkpoint format, per tensor), shards of at most 50 GB as ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``, ``config.json`` with the dtype and architecture, and the
generation config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint.safetensors_stream import Entry, StreamingWriter, plan_shards, write_index

#: ``save_pretrained``'s default ``max_shard_size`` ("50GB").
MAX_SHARD_BYTES = 50 * 10**9


@dataclass(frozen=True)
class Group:
    """Model tensors gathered together and the output tensors made from them (one tensor in,
    one or more out, unless a weight conversion needs several at once)."""

    sources: tuple[str, ...]
    outputs: tuple[Entry, ...]


def plan(model: Any, state: dict[str, Any], tied: dict[str, str] | None = None) -> list[Group]:
    """What ``save_pretrained`` would write for ``state`` (from ``sharded_state_dict``), in
    writing order, worked out on shapes alone (meta tensors): nothing is gathered."""
    names = [n for n in state if n not in set(getattr(model, "_keys_to_ignore_on_save", None) or ())]
    names = _without_tied_duplicates(model, names, tied)
    meta = {n: torch.empty(state[n].shape, dtype=state[n].dtype, device="meta") for n in names}
    groups = [Group((n,), _entries(reverted(model, {n: meta[n]}))) for n in names]
    together = _entries(reverted(model, meta))
    if set(together) != {e for g in groups for e in g.outputs}:
        # A conversion that joins several model tensors into one output: gather them together.
        groups = [Group(tuple(names), together)]
    return groups


def _entries(tensors: dict[str, torch.Tensor]) -> tuple[Entry, ...]:
    return tuple(Entry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items())


def _without_tied_duplicates(model: Any, names: list[str], tied: dict[str, str] | None = None) -> list[str]:
    """``names`` without the second names of tied weights, chosen by ``save_pretrained``'s own
    rule (``remove_tied_weights_from_state_dict``), shown one-element stand-ins that share
    storage exactly where the parameters are shared (``tied``: more alias -> name pairs, for
    copies of one weight held by different pipeline stages)."""
    from automodel_cli.components.checkpoint.state import tied_aliases

    aliases = {**tied_aliases(model), **(tied or {})}
    tokens: dict[str, torch.Tensor] = {}
    for name in names:
        stored = aliases.get(name, name)
        tokens[name] = tokens[stored] if stored in tokens else torch.zeros(1)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older transformers: keep the first name, as they did
        return [n for n in names if n not in aliases]
    kept = remove_tied_weights_from_state_dict(tokens, model)
    return [n for n in names if n in kept]


def reverted(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` in the checkpoint format the model was loaded from (its weight conversions
    reversed, as ``save_pretrained`` does)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers without weight conversions
        return tensors
    return revert_weight_conversion(model, tensors)


def gathered(model: Any, state: dict[str, Any], groups: list[Group], *,
             keep: bool) -> Iterator[tuple[Entry, torch.Tensor | None]]:
    """Each output tensor of ``groups``, whole on CPU where ``keep`` (None elsewhere).
    Collective: every rank iterates to the end. A group's model tensors are gathered when it is
    reached and released before the next group's are."""
    from automodel_cli.components.distributed.parallelize import full_tensor

    for group in groups:
        tensors = {name: full_tensor(state[name], keep=keep) for name in group.sources}
        made = reverted(model, tensors) if keep else {}
        del tensors
        for entry in group.outputs:
            yield entry, made.pop(entry.name, None)
        del made


def pipeline_gathered(model: Any, state: dict[str, Any], groups: list[Group], stages: Any, *,
                      keep: bool) -> Iterator[tuple[Entry, torch.Tensor | None]]:
    """``gathered`` for a pipeline-parallel model: each rank holds one stage's tensors
    (``state``); ``stages`` (a ``PipelineStages``) says whose each tensor is. The owner's ranks
    gather it over their data-parallel group and the one of them in global rank 0's pipeline
    sends it there. Collective: every rank iterates to the end."""
    import torch.distributed as dist

    from automodel_cli.components.distributed.parallelize import full_tensor

    writer_pipeline = dist.get_global_rank(stages.group, 0) == 0  # this pipeline holds global rank 0
    for group in groups:
        if len(group.sources) != 1:
            raise NotImplementedError("weight conversions that join tensors are not written from a pipeline")
        name = group.sources[0]
        owner = stages.owner[name]
        tensor = None
        if owner == stages.rank:
            sender = owner != 0 and writer_pipeline
            tensor = full_tensor(state[name], keep=keep or sender)
            if sender:
                dist.send(tensor.to(stages.device).contiguous(), 0, group=stages.group)
                tensor = None
        elif keep:
            meta = stages.meta[name]
            received = torch.empty(meta.shape, dtype=meta.dtype, device=stages.device)
            dist.recv(received, dist.get_global_rank(stages.group, owner), group=stages.group)
            tensor = received.cpu()
        made = reverted(model, {name: tensor}) if keep else {}
        for entry in group.outputs:
            yield entry, made.pop(entry.name, None)
        del made, tensor


@dataclass
class PipelineStages:
    """Who holds which tensor of a model split into pipeline stages: ``owner`` (name -> pipeline
    rank), ``meta`` (name -> meta tensor: shape and dtype), ``tied`` (alias -> name of one weight
    held by two stages), this rank's place ``rank`` and the pipeline ``group``."""

    owner: dict[str, int]
    meta: dict[str, torch.Tensor]
    tied: dict[str, str]
    rank: int
    group: Any

    @property
    def device(self) -> Any:
        """Where point-to-point transfers happen: the GPU under NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @classmethod
    def collect(cls, state: dict[str, Any], group: Any, tied: dict[str, str]) -> PipelineStages:
        """Every rank's tensor names, shapes and dtypes (collective over the pipeline group)."""
        import torch.distributed as dist

        from automodel_cli.components.checkpoint.collective import gather

        mine = [(name, tuple(value.shape), str(value.dtype).removeprefix("torch.")) for name, value in state.items()]
        everyone = gather((mine, tied), group)
        owner, meta, aliases = {}, {}, {}
        for rank, (names, their_tied) in enumerate(everyone):
            aliases.update(their_tied)
            for name, shape, dtype in names:
                if name not in owner:
                    owner[name] = rank
                    meta[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        aliases = {alias: first for alias, first in aliases.items() if alias in owner and first in owner}
        return cls(owner, meta, aliases, dist.get_rank(group), group)


def write_weights(model: Any, directory: Path | None, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                  pipeline: tuple[Any, dict[str, str]] | None = None) -> list[str]:
    """Write ``model``'s weights into ``directory`` as ``save_pretrained`` names and shards them;
    return the file names. Collective: every rank calls it, rank 0 with the directory (the
    others with None). A write that fails on rank 0 is raised there once every tensor has been
    gathered, so the other ranks never wait for it. ``pipeline``: (the pipeline process group,
    tied alias -> name) when each rank holds one pipeline stage of the model."""
    from automodel_cli.components.distributed.parallelize import sharded_state_dict

    state = sharded_state_dict(model)
    stages = PipelineStages.collect(state, *pipeline) if pipeline is not None else None
    groups = plan(model, stages.meta, stages.tied) if stages is not None else plan(model, state)
    shards = plan_shards([entry for group in groups for entry in group.outputs], max_shard_bytes)
    file_of = {entry.name: (file, entries) for file, entries in shards for entry in entries}
    writer: StreamingWriter | None = None
    failure: Exception | None = None
    tensors = (gathered(model, state, groups, keep=directory is not None) if stages is None
               else pipeline_gathered(model, state, groups, stages, keep=directory is not None))
    for entry, tensor in tensors:
        if directory is not None and failure is None:
            try:
                file, entries = file_of[entry.name]
                if writer is None or writer.path.name != file:
                    if writer is not None:
                        writer.close()
                    writer = StreamingWriter(directory / file, entries, metadata={"format": "pt"})
                writer.write(entry.name, tensor)
            except Exception as exc:  # keep gathering with the others; raise at the end
                failure = exc
                if writer is not None:
                    writer.abort()
        del tensor  # before the next tensor is gathered
    if directory is None:
        return []
    try:
        if failure is None:
            if writer is not None:
                writer.close()
            write_index(directory, shards)
    except Exception as exc:
        failure = exc
    if failure is not None:
        raise failure
    return [file for file, _ in shards]


def write_model_files(model: Any, directory: Path) -> None:
    """``config.json`` (with the model's dtype and architecture), the generation config and any
    custom modelling code, as ``save_pretrained`` writes them."""
    from automodel_cli.components.checkpoint.hf_files import hf_class_name

    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [hf_class_name(model)]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
