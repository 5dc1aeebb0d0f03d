"""Model, optimizer and scheduler state I/O for one checkpoint directory.

Each piece of state is written and read by its own small function so that the sharded
(``torch.distributed.checkpoint``) implementation can replace exactly these functions and
leave the atomic publish / ``latest`` / pruning logic in ``save.py`` untouched.

Reading never unpickles arbitrary objects: every ``torch.load`` goes through
``safe_torch_load`` (``weights_only=True``), and model weights are safetensors.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from automodel_cli.components.checkpoint.fsio import fsync_path
from automodel_cli.components.checkpoint.layout import MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE
from automodel_cli.errors import UserError

_FRESH_START_HINT = "Delete it, point checkpoint.resume at another checkpoint, or start fresh with checkpoint.resume=off."


# ------------------------------------------------------------------------------ reading
def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; missing or damaged files become a
    ``UserError`` naming the file instead of a pickle traceback."""
    if not path.is_file():
        raise UserError(f"Checkpoint file {path} is missing; the checkpoint is incomplete.", _FRESH_START_HINT)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"Checkpoint file {path} is damaged or holds objects that are not plain tensors and "
            f"containers, which are never unpickled for safety ({_first_line(exc)}).",
            _FRESH_START_HINT,
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(
            f"Checkpoint file {path} is corrupted or truncated ({_first_line(exc)}).", _FRESH_START_HINT
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` followed by fsync, so the later publishing rename is durable."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
    fsync_path(path)


# -------------------------------------------------------------------------------- model
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: every parameter with ``requires_grad``.

    Full fine-tuning therefore saves all parameters and PEFT saves only the adapter weights,
    by their names in the wrapped model. Buffers are not saved: persistent buffers are
    not trained and come back with the model weights the run starts from (``model.path``),
    and non-persistent ones (rotary tables) are recomputed. ``named_parameters`` lists a
    tied weight once, under its first name.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_signature(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """name -> shape and dtype, stored in meta.json to recognise a different model."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(tensors.items())}


def signature_checksum(signature: dict[str, dict[str, Any]]) -> str:
    """A short hash of names and shapes (dtype excluded: casting on load is fine)."""
    text = "\n".join(f"{name}:{info['shape']}" for name, info in sorted(signature.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _storage_safe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage, as safetensors requires.

    Parameters may be views into one buffer (tied or flattened weights); the first user of a
    storage keeps it and later ones get a copy, so memory grows only for actual sharing.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh storage of its own
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_model_state(model: torch.nn.Module, directory: Path) -> dict[str, dict[str, Any]]:
    """Write the trainable parameters to ``model.safetensors``; return their signature."""
    tensors = trainable_state(model)
    if not tensors:
        raise ValueError("the model has no trainable parameters, so there is nothing to checkpoint")
    path = directory / MODEL_FILE
    save_file(_storage_safe(tensors), str(path), metadata={"format": "pt"})
    fsync_path(path)
    return param_signature(tensors)


def read_model_state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / MODEL_FILE
    if not path.is_file():
        raise UserError(f"Checkpoint file {path} is missing; the checkpoint is incomplete.", _FRESH_START_HINT)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise UserError(
            f"Checkpoint file {path} is corrupted or truncated ({_first_line(exc)}).", _FRESH_START_HINT
        ) from None


def check_model_matches(model: torch.nn.Module, tensors: dict[str, torch.Tensor], checkpoint: Path,
                        saved_class: str | None = None) -> None:
    """Raise a ``UserError`` naming the first tensor that differs between checkpoint and model."""
    expected = trainable_state(model)
    problems = []
    for name in sorted(set(tensors) | set(expected)):
        if name not in expected:
            problems.append(f"tensor `{name}` is in the checkpoint but is not a trainable parameter of the model")
        elif name not in tensors:
            problems.append(f"trainable parameter `{name}` of the model is not in the checkpoint")
        elif tuple(tensors[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"tensor `{name}` has shape {list(tensors[name].shape)} in the checkpoint but "
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


@torch.no_grad()
def apply_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the (already checked) model parameters, in place."""
    params = trainable_state(model)
    for name, value in tensors.items():
        params[name].copy_(value)


# ------------------------------------------------------------------- optimizer, scheduler
def save_optimizer_state(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    save_torch(optimizer.state_dict(), directory / OPTIMIZER_FILE)


def read_optimizer_state(directory: Path) -> dict:
    return safe_torch_load(directory / OPTIMIZER_FILE)


def apply_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, checkpoint: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"The optimizer state in {checkpoint / OPTIMIZER_FILE} does not fit this run's "
            f"optimizer ({_first_line(exc)}).",
            "Resume with the same optim and peft settings, or start fresh with checkpoint.resume=off.",
        ) from None


def save_scheduler_state(scheduler: Any, directory: Path) -> None:
    save_torch(scheduler.state_dict(), directory / SCHEDULER_FILE)


def read_scheduler_state(directory: Path) -> dict:
    return safe_torch_load(directory / SCHEDULER_FILE)
