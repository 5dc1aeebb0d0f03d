"""The small Hugging Face files a checkpoint carries so it can be consolidated on its own.

``checkpoint consolidate`` turns a checkpoint into a directory ``from_pretrained`` loads; for
that it needs the model's ``config.json`` (and generation config), the tokenizer, and for a
PEFT run the ``adapter_config.json``. Looking for them elsewhere (the run's ``final/``, the
original model directory) fails for runs trained from scratch, runs that never finished, or
hub models on another machine, so rank 0 writes them into ``hf/`` of every checkpoint. They
are a few kilobytes (a tokenizer a few megabytes) beside gigabytes of weights.
"""

from __future__ import annotations

import enum
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automodel_cli.components.models.structure import is_peft_model, unwrap

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"


def hf_class_name(model: Any) -> str:
    """The model's own class name, not the ``FSDP...`` subclass ``fully_shard`` creates."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # type: ignore[assignment]
    for cls in type(model).__mro__:
        if not (FSDPModule and issubclass(cls, FSDPModule)):
            return cls.__name__
    return type(model).__name__


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


def adapter_info(model: Any) -> dict[str, Any] | None:
    """Name, base model and config of the active adapter of a peft model (None otherwise)."""
    if not is_peft_model(model):
        return None
    name = getattr(model, "active_adapter", None) or "default"
    if isinstance(name, (list, tuple)):
        name = name[0]
    config = model.peft_config[name]
    data = config.to_dict()
    return {"adapter_name": name, "peft_type": _json_default(data.get("peft_type")),
            "base_model_name_or_path": data.get("base_model_name_or_path"),
            "config": json.loads(json.dumps(data, default=_json_default))}


def hf_payload(model: Any, tokenizer: Any = None,
               extra_files: Mapping[str, bytes | str] | None = None) -> dict[str, bytes]:
    """file name -> content for ``hf/``: config, generation config, adapter config, tokenizer
    files, then ``extra_files`` (which win on a name clash)."""
    files: dict[str, bytes] = {}
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        data = json.loads(config.to_json_string(use_diff=False))
        data["architectures"] = [hf_class_name(base)]
        files[CONFIG] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    generation = getattr(base, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        try:
            files[GENERATION_CONFIG] = generation.to_json_string(use_diff=True).encode()
        except Exception:  # an invalid generation config must not block a checkpoint
            pass
    adapter = adapter_info(model)
    if adapter is not None:
        files[ADAPTER_CONFIG] = (json.dumps(adapter["config"], indent=2, sort_keys=True) + "\n").encode()
    if tokenizer is not None:
        files.update(tokenizer_files(tokenizer))
    for name, content in (extra_files or {}).items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"extra_files names must be relative paths inside the checkpoint, got {name!r}")
        files[name] = content.encode() if isinstance(content, str) else bytes(content)
    return files


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """What ``tokenizer.save_pretrained`` writes, as bytes."""
    with tempfile.TemporaryDirectory(prefix="automodel-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
