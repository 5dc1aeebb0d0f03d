"""Cheap checks of a local model directory, before its tokenizer, the data or the model load.

A wrong ``model.path`` should be reported for what it is, in well under a second, and not as
whatever the first loader to trip over it says (the tokenizer loads first, so a directory
without ``config.json`` would otherwise look like a tokenizer problem, and a truncated weight
file would fail only once the data is ready). The checks read only small things:

* ``config.json``: present, valid JSON, and no modelling code to run unless
  ``model.trust_remote_code`` allows it (``auto_map`` with a ``model_type`` transformers does not
  know);
* the weight files ``from_pretrained`` will read, in its order of preference
  (``model.safetensors``, its sharded index, ``pytorch_model.bin``, its index): every shard is
  there; a safetensors file's header is whole and the file as long as the header says; a
  ``.bin`` file is opened with ``weights_only=True`` and tensors on the meta device, which
  refuses pickled objects other than tensors and containers without reading any tensor data.

No torch at import time.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir
from automodel_cli.errors import UserError

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library enforces


@dataclass(frozen=True)
class Role:
    """Whose model a source is, so that messages name the keys the user sets."""

    name: str = "model"
    path_key: str = "model.path"
    tokenizer_key: str = "model.tokenizer"
    trust_setting: str = "model.trust_remote_code=true"
    trust_note: str = ""
    from_scratch_key: str | None = "model.from_scratch"

    @property
    def title(self) -> str:
        return self.name[:1].upper() + self.name[1:]


MODEL = Role()


def role_of(model_cfg: Any) -> Role:
    """The ``Role`` a model section carries (a plain ``model`` section: ``MODEL``)."""
    role = getattr(model_cfg, "role", None)
    return role if isinstance(role, Role) else MODEL


# --------------------------------------------------------------------------- config.json
def _listing(directory: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _not_a_model_dir(directory: Path, shown: str, role: Role) -> UserError:
    key, title = role.path_key, role.title
    if (directory / ADAPTER_CONFIG_FILE).exists():
        return UserError(
            f"{title} directory `{shown}` ({key}) holds a LoRA/DoRA adapter (adapter_config.json), not a "
            f"full model.",
            f"Merge it into its base first (`automodel convert merge-lora {shown} --out DIR`) and set {key}=DIR, "
            f"or train with peft.merge=true and use final/merged.",
        )
    if (RunDir(directory).final / CONFIG_FILE).is_file():
        return UserError(f"`{shown}` ({key}) is a run directory, not a model directory (no config.json).",
                         f"Use the model the run wrote: {key}={shown.rstrip('/')}/final.")
    if RunDir(directory).checkpoints.is_dir():
        return UserError(
            f"`{shown}` ({key}) is a run directory without a final model, not a model directory (no config.json).",
            f"Export its latest checkpoint (`automodel checkpoint consolidate {shown} --out DIR`) and set {key}=DIR.",
        )
    holds = f"it holds {_listing(directory)}" if any(directory.iterdir()) else "it is empty"
    return UserError(
        f"`{shown}` ({key}) is not a model directory: it has no config.json ({holds}).",
        f"Point {key} at a directory written by save_pretrained (config.json and model.safetensors), such as "
        f"a run's final/ directory, or at a Hugging Face hub id.",
    )


def read_config_json(directory: Path, shown: str, role: Role = MODEL) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict; a ``UserError`` saying what is wrong
    (no such file: with what the directory holds instead; not JSON: with the line)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _not_a_model_dir(directory, shown, role)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"`{path}` ({role.path_key}) is not valid JSON (line {exc.lineno}: {exc.msg}).",
                        "Restore the file from the model's source, or write it again with save_pretrained.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"`{path}` ({role.path_key}) cannot be read ({exc}).",
                        "Check the file's permissions and encoding (UTF-8 JSON).") from None
    if not isinstance(data, dict):
        raise UserError(f"`{path}` ({role.path_key}) does not hold a JSON object.",
                        "Restore the file from the model's source, or write it again with save_pretrained.")
    return data


def remote_code_error(shown: str, role: Role, detail: str) -> UserError:
    """The message for a model whose code ships with the checkpoint and is not trusted."""
    return UserError(
        f"{role.title} `{shown}` ({role.path_key}) needs Python code that ships with the checkpoint: {detail}. "
        f"That code is not run unless you allow it.",
        f"Set {role.trust_setting} to run it{role.trust_note}; this executes the checkpoint's .py files with "
        f"your permissions, so only do it for a source you trust. Otherwise pick a model whose architecture "
        f"transformers supports natively.",
    )


def check_remote_code(config: dict[str, Any], shown: str, role: Role, *, trusted: bool) -> None:
    """Refuse a config that only custom code can load (``auto_map`` and a ``model_type`` that
    transformers does not know) unless ``trusted``; known architectures load without it."""
    auto_map = config.get("auto_map")
    if trusted or not auto_map:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:
        return
    classes = sorted(set(auto_map.values())) if isinstance(auto_map, dict) else []
    named = f"model_type `{model_type}`" if model_type else "no model_type"
    raise remote_code_error(shown, role, f"its config.json has {named}, which this transformers does not know, "
                                         f"and maps it to {', '.join(map(str, classes[:3])) or 'custom classes'} "
                                         f"(auto_map)")


# -------------------------------------------------------------------------------- weights
def _index_shards(index: Path, shown: str, role: Role) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"Weight index `{index}` ({role.path_key}) is corrupt ({type(exc).__name__}: {exc}).",
                        "Download or copy the model again.") from None
    shards = [index.parent / name for name in names]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise UserError(
            f"`{shown}` ({role.path_key}) is incomplete: {index.name} lists {len(shards)} weight files and "
            f"{len(missing)} are missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}).",
            "Download or copy the model again (an interrupted download leaves this).",
        )
    return shards


def weight_files(directory: Path, shown: str, role: Role = MODEL) -> list[Path]:
    """The files ``from_pretrained`` reads from ``directory``, in its order of preference; a
    ``UserError`` when there are none (naming weight-like files it would not read)."""
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    if (directory / SAFE_INDEX).is_file():
        return _index_shards(directory / SAFE_INDEX, shown, role)
    if (directory / BIN_WEIGHTS).is_file():
        return [directory / BIN_WEIGHTS]
    if (directory / BIN_INDEX).is_file():
        return _index_shards(directory / BIN_INDEX, shown, role)
    others = sorted(p.name for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    found = f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not read by from_pretrained)" if others else ""
    scratch = (f", or set {role.from_scratch_key}=true to train from a random initialisation"
               if role.from_scratch_key else "")
    raise UserError(
        f"{role.title} directory `{shown}` ({role.path_key}) has a model config but no weights: no "
        f"{SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS}{found}.",
        f"Point {role.path_key} at a directory written by save_pretrained (a run's final/ directory){scratch}.",
    )


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (None when header and length agree).

    The format is an 8-byte little-endian header length, a JSON header giving every tensor's
    byte range, then the data; a copy cut short fails one of these checks without any tensor
    being read.
    """
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, not even the 8-byte header length"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _SAFETENSORS_MAX_HEADER:
            return f"its header length field says {header_len} bytes: not a safetensors file"
        if 8 + header_len > size:
            return f"the header needs {8 + header_len} bytes but the file has {size}"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "its header is not valid safetensors JSON"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"the header describes {expected} bytes but the file has {size}"
    if size > expected:
        return f"{size - expected} bytes more than the header describes"
    return None


_REFUSED_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global:?)\s+(?:GLOBAL\s+)?`?([\w.]+)", re.IGNORECASE)


def pickle_problem(path: Path) -> tuple[str, str] | None:
    """("unsafe", what) or ("corrupt", why) for a ``.bin`` file ``torch.load(weights_only=True)``
    refuses; None when it opens. Tensors go to the meta device: no data is read."""
    import pickle

    import torch

    try:
        torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            match = _REFUSED_GLOBAL.search(text)
            return ("unsafe", f"`{match.group(1)}`" if match else "objects other than tensors")
        return ("corrupt", _first_line(exc))
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        return ("corrupt", _first_line(exc))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def convert_bin_command(directory: str) -> str:
    """A command that rewrites a trusted ``.bin`` model directory as safetensors."""
    out = directory.rstrip("/") + "-safetensors"
    return (f"python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            f"M.from_pretrained({directory!r}, weights_only=False).save_pretrained({out!r}); "
            f"T.from_pretrained({directory!r}).save_pretrained({out!r})\"")


def check_weight_file(path: Path, shown: str, role: Role = MODEL) -> None:
    """A ``UserError`` naming ``path`` when it is truncated, corrupt or an unsafe pickle."""
    key = role.path_key
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"Weight file `{path}` ({key}) is corrupt or truncated ({problem}).",
                            "Download or copy the model again (a copy or download cut short leaves this).")
        return
    found = pickle_problem(path)
    if found is None:
        return
    kind, detail = found
    if kind == "corrupt":
        raise UserError(f"Weight file `{path}` ({key}) is corrupt or truncated ({detail}).",
                        "Download or copy the model again (a copy or download cut short leaves this).")
    raise UserError(
        f"Weight file `{path}` ({key}): unsafe pickle refused. It holds {detail}, and unpickling that "
        f"would run code from the file; automodel reads only plain tensors from pickles (weights_only=True).",
        f"If you trust the file, convert the model to safetensors once: {convert_bin_command(shown)} "
        f"and set {key}={shown.rstrip('/')}-safetensors.",
    )


def check_model_dir(directory: Path, shown: str, role: Role = MODEL, *, trust_remote_code: bool,
                    weights: bool) -> None:
    """Everything about a local model directory that can be checked without loading it:
    config.json, custom code, and (``weights``) the weight files."""
    config = read_config_json(directory, shown, role)
    check_remote_code(config, shown, role, trusted=trust_remote_code)
    if weights:
        for path in weight_files(directory, shown, role):
            check_weight_file(path, shown, role)
