"""Model, optimizer and scheduler state I/O for one checkpoint directory.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict``/``set_model_state_dict`` and the optimizer counterparts), so the same
code handles a plain module, an FSDP2/TP (DTensor) sharded one and a peft model, and keys are
canonical parameter names (no FSDP, DDP, ``torch.compile`` or activation-checkpoint wrapper
prefixes). They are written with ``dcp.save`` to ``model/`` and ``optim/``: every rank writes
its own shards, and a later load on a different number of ranks reshards.

Each piece of state is written and read by its own small function; ``save.py`` and
``load.py`` own ordering, atomic publishing and the collectives around them.

Reading never unpickles arbitrary objects: ``.pt`` files go through ``safe_torch_load``
(``weights_only=True``), DCP directories through ``dcp_io`` (allow-listed metadata,
``weights_only`` values).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.checkpoint import dcp_io, stages
from automodel_cli.components.checkpoint.fsio import fsync_path
from automodel_cli.components.checkpoint.layout import MODEL_DIR, OPTIMIZER_DIR, SCHEDULER_FILE
from automodel_cli.errors import UserError

_FRESH_START_HINT = "Delete it, point checkpoint.resume at another checkpoint, or start fresh with checkpoint.resume=off."
_WRAPPER_PARTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


# ------------------------------------------------------------------------------ reading
def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; missing or damaged files become a
    ``UserError`` naming the file instead of a pickle traceback."""
    if not path.is_file():
        raise dcp_io.missing(path, _FRESH_START_HINT)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise dcp_io.DamagedCheckpoint(
            f"Checkpoint file {path} is damaged or holds objects that are not plain tensors and "
            f"containers, which are never unpickled for safety ({_first_line(exc)}).",
            _FRESH_START_HINT,
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise dcp_io.damaged(path, _first_line(exc), _FRESH_START_HINT) from None


_first_line = dcp_io.first_line


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` followed by fsync, so the later publishing rename is durable."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
    fsync_path(path)


# -------------------------------------------------------------------------------- model
def canonical_name(model: torch.nn.Module, name: str) -> str:
    """The key ``get_model_state_dict`` uses for parameter ``name`` (wrapper prefixes removed)."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns

        fqns = _get_fqns(model, name)
        if len(fqns) == 1:
            return next(iter(fqns))
    except Exception:  # private helper: fall back to the same rule spelled out
        pass
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Canonical names of the parameters a checkpoint stores: those with ``requires_grad``.

    Full fine-tuning therefore saves all parameters and PEFT only the adapter weights, by their
    names in the wrapped model. Buffers are not saved: persistent buffers are not trained and
    come back with the weights the run starts from (``model.path``), non-persistent ones
    (rotary tables) are recomputed. A tied weight is stored once, under its first name.
    """
    return [canonical_name(model, n) for n, p in model.named_parameters() if p.requires_grad]


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """alias -> stored name for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first:
            aliases[canonical_name(model, name)] = first[key]
        else:
            first[key] = canonical_name(model, name)
    return aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as ``get_model_state_dict`` returns them (local shards as
    DTensors for a sharded model; the tensors share storage with the parameters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    wanted = set(trainable_names(model))
    if not wanted:
        raise ValueError("the model has no trainable parameters, so there is nothing to checkpoint")
    full = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    state = {k: v for k, v in full.items() if k in wanted}
    missing = wanted - set(state)
    if missing:  # a parameter the state dict does not expose under its canonical name
        raise RuntimeError(f"get_model_state_dict does not return the parameters {sorted(missing)[:5]}")
    return state


def param_signature(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """name -> global shape and dtype, stored in meta.json to recognise a different model."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(tensors.items())}


def signature_checksum(signature: dict[str, dict[str, Any]]) -> str:
    """A short hash of names and shapes (dtype excluded: casting on load is fine)."""
    text = "\n".join(f"{name}:{info['shape']}" for name, info in sorted(signature.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def mesh_description(tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Shape, dimension names and placements of the first DTensor's device mesh, if any."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    for tensor in tensors.values():
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            return {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or []),
                    "device_type": mesh.device_type,
                    "placements": [str(p) for p in tensor.placements]}
    return None


def save_model_state(model: torch.nn.Module, directory: Path,
                     background: dcp_io.BackgroundWrites | None = None) -> dict[str, Any]:
    """Write the trainable parameters to ``directory/model/`` (collective when distributed), or
    with ``background`` stage them and let it write them; return their signature and the mesh
    they were sharded over."""
    tensors = model_state(model)
    _dcp_save(tensors, directory / MODEL_DIR, background)
    params = param_signature(tensors)
    if stages.part() is not None:  # every stage's parameters, for meta.json (collective)
        params = dict(sorted({k: v for part in stages.part().everyone(params) for k, v in part.items()}.items()))
    return {"params": params, "mesh": mesh_description(tensors), "tied": stages.all_tied()}


def _dcp_save(state: dict[str, Any], directory: Path, background: dcp_io.BackgroundWrites | None) -> None:
    from automodel_cli.components.checkpoint import collective

    if background is not None:
        background.save(state, directory)
    else:
        dcp_io.save(state, directory, distributed=collective.active())


def check_model_matches(model: torch.nn.Module, metadata: Any, checkpoint: Path,
                        saved_class: str | None = None) -> None:
    """Raise a ``UserError`` naming the first tensor that differs between checkpoint and model."""
    stored = dcp_io.tensor_infos(metadata)
    expected = {k: v for k, v in model_state(model).items()}
    reads = stages.stored_names(list(expected), set(stored))  # a pipeline stage's tied head copy
    elsewhere = (stages.other_stages(set(expected)) | set(reads.values())  # held by other stages
                 | stages.tied_copies(set(stored), tied_aliases(model)))  # a stage's copy of a tied weight
    problems = []
    for name in dcp_io.byte_values(metadata):
        problems.append(f"entry `{name}` in {MODEL_DIR}/ is not a tensor")
    for name in sorted(set(stored) | set(expected)):
        source = reads.get(name, name)
        if name not in expected:
            if name not in elsewhere:
                problems.append(f"tensor `{name}` is in the checkpoint but is not a trainable parameter of the model")
        elif source not in stored:
            problems.append(f"trainable parameter `{name}` of the model is not in the checkpoint")
        elif tuple(stored[source].shape) != tuple(expected[name].shape):
            problems.append(
                f"tensor `{name}` has shape {list(stored[name].shape)} in the checkpoint but "
                f"{list(expected[name].shape)} in the model"
            )
    if not problems:
        return
    saved = f" (saved from {saved_class})" if saved_class else ""
    more = f" ({len(problems) - 1} more differences)" if len(problems) > 1 else ""
    raise UserError(
        f"Checkpoint {checkpoint}{saved} does not fit the model {type(model).__name__}: "
        f"{problems[0]}{more}.",
        "Resume with the same model.path and peft settings the checkpoint was saved with, "
        "or start fresh with checkpoint.resume=off.",
    )


def load_model_state(model: torch.nn.Module, checkpoint: Path, metadata: Any) -> None:
    """Read ``model/`` into the model's parameters, resharding to the current layout
    (collective when distributed). Call only after ``check_model_matches``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors = model_state(model)
    reads = stages.stored_names(list(tensors), set(dcp_io.tensor_infos(metadata)))
    # DCP fills the tensors in place (they are the same objects under the checkpoint's names).
    _dcp_load({reads.get(k, k): v for k, v in tensors.items()}, checkpoint / MODEL_DIR, metadata)
    set_model_state_dict(model, tensors, options=StateDictOptions(strict=False))


def _dcp_load(state: dict[str, Any], directory: Path, metadata: Any) -> None:
    from automodel_cli.components.checkpoint import collective

    dcp_io.load(state, directory, distributed=collective.active(), metadata=metadata)


# ------------------------------------------------------------------- optimizer, scheduler
def _optim_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by canonical parameter names (``state.NAME.exp_avg``,
    ``param_groups.NAME.lr``, ...); initialises an empty optimizer's state first (a step with
    zero gradients and lr 0, which leaves the parameters unchanged)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_optim_options())


def save_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                         background: dcp_io.BackgroundWrites | None = None) -> None:
    _dcp_save(optimizer_state(model, optimizer), directory / OPTIMIZER_DIR, background)


def check_optimizer_matches(template: dict[str, Any], metadata: Any, checkpoint: Path,
                            tied: dict[str, str] | None = None) -> None:
    """Raise a ``UserError`` when the saved optimizer state does not fit ``template`` (from
    ``optimizer_state``); ``tied``: the model's tied names (``tied_aliases``)."""
    stored = metadata.state_dict_metadata
    tensors = dcp_io.tensor_infos(metadata)
    reads = stages.stored_names(list(template), set(stored))  # a pipeline stage's tied head copy
    elsewhere = (stages.other_stages(set(template)) | set(reads.values())  # held by other stages
                 | stages.tied_copies(set(stored), tied or {}))  # a stage's copy of a tied weight
    template = {reads.get(k, k): v for k, v in template.items()}
    problem = None
    for name, value in sorted(template.items()):
        if name not in stored:
            problem = f"`{name}` is not in the checkpoint"
        elif isinstance(value, torch.Tensor) and name not in tensors:
            problem = f"`{name}` is not a tensor in the checkpoint"
        elif isinstance(value, torch.Tensor) and tuple(tensors[name].shape) != tuple(value.shape):
            problem = (f"`{name}` has shape {list(tensors[name].shape)} in the checkpoint but "
                       f"{list(value.shape)} here")
        if problem:
            break
    if problem is None:
        extra = sorted(set(stored) - set(template) - elsewhere, key=lambda k: (not k.startswith("state."), k))
        if extra:
            problem = f"the checkpoint has `{extra[0]}`, which this optimizer does not"
    if problem:
        raise UserError(
            f"The optimizer state in {checkpoint / OPTIMIZER_DIR} does not fit this run's optimizer ({problem}).",
            "Resume with the same optim and peft settings, or start fresh with checkpoint.resume=off.",
        )


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         template: dict[str, Any], checkpoint: Path, metadata: Any) -> None:
    """Read ``optim/`` into ``template`` (from ``optimizer_state``) and apply it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    reads = stages.stored_names(list(template), set(metadata.state_dict_metadata))
    if reads:  # a pipeline stage's tied head copy reads the embedding's state
        renamed = {reads.get(k, k): v for k, v in template.items()}
        _dcp_load(renamed, checkpoint / OPTIMIZER_DIR, metadata)
        template = {k: renamed[reads.get(k, k)] for k in template}
    else:
        _dcp_load(template, checkpoint / OPTIMIZER_DIR, metadata)
    try:
        set_optimizer_state_dict(model, optimizer, template, options=_optim_options())
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"The optimizer state in {checkpoint / OPTIMIZER_DIR} does not fit this run's "
            f"optimizer ({_first_line(exc)}).",
            "Resume with the same optim and peft settings, or start fresh with checkpoint.resume=off.",
        ) from None


def save_scheduler_state(scheduler: Any, directory: Path) -> None:
    save_torch(scheduler.state_dict(), directory / SCHEDULER_FILE)


def read_scheduler_state(directory: Path) -> dict:
    return safe_torch_load(directory / SCHEDULER_FILE)
