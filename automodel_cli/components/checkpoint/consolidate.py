"""Turn a (sharded) training checkpoint into a Hugging Face model or peft adapter directory.

``consolidate(source, out)`` reads the DCP index of ``model/``, then streams one tensor at a
time (``dcp.load`` of a one-key state dict, no process group, any number of saving ranks) into
safetensors files whose header is computed up front, so peak memory is about the largest
tensor, not the model. Key names are the canonical parameter names ``get_model_state_dict``
gives, which are the names ``from_pretrained`` expects (no FSDP, DDP, compile or
activation-checkpoint prefixes).

* Full fine-tune: ``model.safetensors`` (sharded with an index above ``max_shard_bytes``) +
  ``config.json``, generation config and tokenizer. Tied weights are written once, as
  ``save_pretrained`` does, when the config ties them.
* LoRA/DoRA, default: an adapter directory (``adapter_model.safetensors`` +
  ``adapter_config.json``, keys as peft saves them) that ``PeftModel.from_pretrained`` loads.
* LoRA/DoRA with ``merge_lora``: base weights (safetensors, read one tensor at a time) with
  ``W + scale * B @ A`` (DoRA: rescaled by the magnitude vector) folded in: a plain HF model.
  For a vision-language base model the adapter's module names are paired with the base files'
  saved names by the model's own weight conversions (``_module_names``).
* A checkpoint of the trainable parameters only (a VLM with its vision tower frozen): the base
  weights with the checkpoint's tensors in place of the trained ones, paired by the same names.

Config and tokenizer come from the checkpoint's ``hf/`` folder (written at save time), else
from the run directory (``final/``, ``base_model/``, or ``model.path``/``model.tokenizer`` of
its ``config.yaml`` when that is a local directory).

The output is written to a temporary sibling directory and renamed into place at the end; an
existing non-empty ``out`` is refused and never touched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from automodel_cli.run_layout import RunDir
from automodel_cli.components.checkpoint import dcp_io, layout
from automodel_cli.components.checkpoint.expert_lora import Piece, expert_adapters, merged_piece, saved_pieces
from automodel_cli.components.checkpoint.fsio import fsync_dir, remove_tree
from automodel_cli.components.checkpoint.hf_files import ADAPTER_CONFIG, CONFIG, GENERATION_CONFIG
from automodel_cli.components.checkpoint.safetensors_stream import (
    Entry,
    StreamingWriter,
    plan_shards,
    write_index,
)
from automodel_cli.components.models.hub import cached_snapshot
from automodel_cli.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
_HINT_PATH = "Pass a checkpoint directory (checkpoints/step_XXXXXXXX) or a run directory (with checkpoints/)."


# ---------------------------------------------------------------------------- locating
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run (or ``checkpoints``) directory meaning its latest one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist.", _HINT_PATH)
    if layout.is_checkpoint_dir(path):
        return path.resolve()
    if path.is_dir():
        for root in (layout.checkpoints_root(path), path):
            if root.is_dir() and ((root / layout.LATEST_FILE).exists() or layout.list_checkpoints(root)):
                found = layout.resolve_latest(root)
                if found is not None:
                    return found.resolve()
                raise UserError(f"{path} holds no finished checkpoint.", _HINT_PATH)
    raise UserError(
        f"{path} is not a checkpoint (no {layout.META_FILE}) and not a run directory with a "
        f"`{layout.CHECKPOINTS_DIR}/` folder.", _HINT_PATH)


def run_dir_of(checkpoint: Path) -> Path | None:
    parent = checkpoint.parent
    return parent.parent if parent.name == layout.CHECKPOINTS_DIR else None


def run_config(run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` (empty when there is none or it cannot be read)."""
    if run_dir is None or not RunDir(run_dir).config.is_file():
        return {}
    from automodel_cli.config.yaml_io import load_yaml_file

    try:
        data, _ = load_yaml_file(RunDir(run_dir).config)
    except (UserError, OSError, ValueError):  # unreadable or not YAML: the other sources still count
        return {}
    return data if isinstance(data, dict) else {}


def _local_dir(value: Any, run_dir: Path | None) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    candidate = Path(value).expanduser()
    for option in ([candidate] if candidate.is_absolute() else [candidate, *( [run_dir / candidate] if run_dir else [])]):
        if option.is_dir():
            return option.resolve()
    return None


# ------------------------------------------------------------------------ base weights
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class BaseWeights:
    """Tensors of a Hugging Face model directory's safetensors files, read one at a time."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"Base model directory {directory} has no *.safetensors weights.",
                            "Pass --base-model DIR with the weights the adapter was trained on.")
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        self._where[name] = file
                        self._meta[name] = (_SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))
            except Exception as exc:
                raise UserError(f"Base model file {file} cannot be read ({dcp_io.first_line(exc)}).") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._meta[name]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)


# ---------------------------------------------------------------------------- the plan
@dataclass
class Output:
    """One output tensor: its name, dtype and shape, and how to produce it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


@dataclass
class Result:
    checkpoint: Path
    out: Path
    kind: str  # "model", "adapter" or "merged"
    step: int
    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    config_source: str | None = None
    tokenizer_source: str | None = None
    base_source: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class _Checkpoint:
    def __init__(self, path: Path) -> None:
        from automodel_cli.components.checkpoint.load import read_meta

        self.path = path
        self.meta = read_meta(path)
        self.model_dir = path / layout.MODEL_DIR
        self.index = dcp_io.read_metadata(self.model_dir)
        dcp_io.check_files(self.model_dir, self.index)
        self.infos = dcp_io.tensor_infos(self.index)

    def read(self, name: str) -> torch.Tensor:
        return dcp_io.read_tensor(self.model_dir, self.infos[name], self.index)


def _cast(dtype: torch.dtype | None) -> Callable[[torch.dtype], torch.dtype]:
    return lambda d: dtype if dtype is not None and d.is_floating_point else d


def _remove_adapter_name(key: str, adapter: str) -> str:
    """peft's rule: ``...lora_A.default.weight`` -> ``...lora_A.weight``."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter}"):
        return key.removesuffix(f".{adapter}")
    head, _, suffix = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter}") + r"$", "", head)
    return f"{head}.{suffix}"


def adapter_key(key: str, adapter: str) -> str:
    """The key peft's ``save_pretrained`` writes for parameter ``key`` of adapter ``adapter``."""
    marker = f".modules_to_save.{adapter}."
    if marker in key:
        return key.replace(marker, ".")
    dora = f"lora_magnitude_vector.{adapter}.weight"
    if key.endswith(dora):  # peft keeps DoRA's pre-refactor key: no ".weight"
        return key.removesuffix(f".{adapter}.weight")
    return _remove_adapter_name(key, adapter)


def _plan_full(ckpt: _Checkpoint, config: dict[str, Any], cast) -> list[Output]:
    tied = ckpt.meta.get("tied", {})
    # A tied weight saved twice (once per pipeline stage that holds a copy) is written once.
    twice = {alias for alias, stored in tied.items() if alias in ckpt.infos and stored in ckpt.infos}
    outputs = [Output(name, cast(info.dtype), info.shape, lambda n=name: ckpt.read(n))
               for name, info in ckpt.infos.items()
               if not (config.get("tie_word_embeddings", False) and name in twice)]
    if not config.get("tie_word_embeddings", False):
        for alias, stored in sorted(ckpt.meta.get("tied", {}).items()):
            if stored in ckpt.infos and alias not in ckpt.infos:
                info = ckpt.infos[stored]
                outputs.append(Output(alias, cast(info.dtype), info.shape, lambda n=stored: ckpt.read(n)))
    return outputs


def _plan_adapter(ckpt: _Checkpoint, adapter: str, cast) -> list[Output]:
    outputs = []
    for name, info in ckpt.infos.items():
        outputs.append(Output(adapter_key(name, adapter), cast(info.dtype), info.shape,
                              lambda n=name: ckpt.read(n)))
    return outputs


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _plan_overlay(ckpt: _Checkpoint, base: BaseWeights, cast, *, peft: dict[str, Any] | None,
                  adapter_config: dict[str, Any] | None) -> list[Output]:
    """Base weights, with checkpoint tensors replacing (full) or LoRA deltas merged into them."""
    adapter = (peft or {}).get("adapter_name", "default")
    prefix = PEFT_PREFIX if peft else ""
    used: set[str] = set()
    outputs = []
    cfg = adapter_config or {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    meta_model = _meta_model(base, adapter_config)
    module_names = _module_names(meta_model)  # checkpoints are keyed by the module's names
    pieces = _expert_pieces(meta_model, base, adapter_config, adapter)
    for key in base.keys():
        dtype, shape = base.entry(key)
        if key in pieces:  # a fused expert parameter's LoRA, in the base's own per-expert format
            spec = pieces[key].adapter
            used.update(f"{prefix}{spec.module}.lora_{ab}.{adapter}.weight" for ab in "AB")
            outputs.append(Output(key, cast(dtype), shape, lambda key=key: merged_piece(
                pieces[key], base.read(key), ckpt.read, prefix, adapter)))
            continue
        name = module_names.get(key, key)
        module, _, suffix = name.rpartition(".")
        replacements = [f"{prefix}{name}", f"{prefix}{module}.base_layer.{suffix}",
                        f"{prefix}{module}.modules_to_save.{adapter}.{suffix}"] if peft else [name]
        found = next((r for r in replacements if r in ckpt.infos), None)
        lora_a = f"{prefix}{module}.lora_A.{adapter}.weight"
        if peft and suffix == "weight" and lora_a in ckpt.infos:
            lora_b = f"{prefix}{module}.lora_B.{adapter}.weight"
            magnitude = f"{prefix}{module}.lora_magnitude_vector.{adapter}.weight"
            if lora_b not in ckpt.infos:
                raise UserError(f"Checkpoint {ckpt.path} has `{lora_a}` but no `{lora_b}`.")
            r = ckpt.infos[lora_a].shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            used.update({lora_a, lora_b})
            has_magnitude = magnitude in ckpt.infos
            if has_magnitude:
                used.add(magnitude)
            source = found  # the base weight itself may also have been trained
            if source:
                used.add(source)

            def merged(key=key, a=lora_a, b=lora_b, m=magnitude if has_magnitude else None, scale=scale,
                       source=source, dtype=dtype) -> torch.Tensor:
                weight = (ckpt.read(source) if source else base.read(key)).float()
                delta = ckpt.read(b).float() @ ckpt.read(a).float() * scale
                if fan_in_fan_out:
                    delta = delta.T
                if m is not None:  # DoRA: magnitude / column norm of the adapted weight
                    oriented = (weight + delta).T if fan_in_fan_out else weight + delta
                    norm = torch.linalg.norm(oriented, dim=1)
                    factor = (ckpt.read(m).float() / norm).view(-1, 1)
                    factor = factor.T if fan_in_fan_out else factor
                    return (factor * (weight + delta)).to(dtype)
                return (weight + delta).to(dtype)

            outputs.append(Output(key, cast(dtype), shape, merged))
            continue
        if found is not None:
            info = ckpt.infos[found]
            if tuple(info.shape) != tuple(shape):
                raise UserError(f"Tensor `{found}` of checkpoint {ckpt.path} has shape {list(info.shape)}, "
                                f"but `{key}` of the base model {base.directory} has {list(shape)}.",
                                "Pass --base-model DIR with the model the run was trained from.")
            used.add(found)
            outputs.append(Output(key, cast(info.dtype), shape, lambda n=found: ckpt.read(n)))
        else:
            outputs.append(Output(key, cast(dtype), shape, lambda n=key: base.read(n)))
    leftover = sorted(set(ckpt.infos) - used)
    if leftover:
        raise UserError(
            f"Cannot merge checkpoint {ckpt.path} into {base.directory}: tensor `{leftover[0]}` "
            f"matches no base weight{f' ({len(leftover) - 1} more)' if len(leftover) > 1 else ''}.",
            "Merging supports LoRA/DoRA on linear layers and modules_to_save; export the adapter "
            "without --merge-lora, or check --base-model.")
    return outputs


def _meta_model(base: BaseWeights, adapter_config: dict[str, Any] | None) -> Any | None:
    """The base model built on the meta device (no memory), for the two merges that need the
    model's own weight conversions: a vision-language model's (its modules are named unlike its
    saved keys) and a LoRA on fused expert parameters (``target_parameters``; the experts are
    saved per expert). None for any other model."""
    from transformers import AutoConfig

    from automodel_cli.components.models.vlm import auto_class, is_vision_language

    config_json = _read_json(base.directory / CONFIG)
    if not config_json or not (is_vision_language(config_json) or (adapter_config or {}).get("target_parameters")):
        return None
    config = AutoConfig.from_pretrained(base.directory)
    with torch.device("meta"):
        return auto_class(config).from_config(config)


def _module_names(model: Any | None) -> dict[str, str]:
    """Saved key -> the model's parameter name, where the model's weight conversions rename keys
    on load (a VLM's ``model.layers.*`` on disk is ``model.language_model.layers.*`` in the
    module, Mixtral's ``block_sparse_moe`` is ``mlp``), under which the adapter was trained."""
    from automodel_cli.components.models.materialize import saved_names

    if model is None:
        return {}
    # fused expert parameters (3-D) are split, not renamed: ``_expert_pieces`` pairs those
    names = [n for n, p in model.named_parameters() if p.ndim < 3]
    return {saved: name for name, saved in saved_names(model, names).items()}


def _expert_pieces(model: Any | None, base: BaseWeights, adapter_config: dict[str, Any] | None,
                   adapter: str) -> dict[str, Piece]:
    """Saved key -> the piece of a LoRA-adapted fused expert parameter it holds (empty when the
    adapter changes no experts)."""
    if model is None or not (adapter_config or {}).get("target_parameters"):
        return {}
    adapters = expert_adapters(model, adapter_config, adapter)
    return saved_pieces(model, adapters, set(base.keys())) if adapters else {}


# ------------------------------------------------------------------------ side files
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _candidate_dirs(ckpt: _Checkpoint, run_dir: Path | None, cfg: dict[str, Any]) -> list[tuple[str, Path]]:
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    dirs: list[tuple[str, Path | None]] = [("checkpoint hf/", ckpt.path / layout.HF_DIR)]
    if run_dir is not None:
        dirs += [("run final/", RunDir(run_dir).final), ("run base_model/", RunDir(run_dir).base_model)]
    dirs += [("model.tokenizer", _local_dir(model_cfg.get("tokenizer"), run_dir)),
             ("model.path", _local_dir(model_cfg.get("path"), run_dir))]
    return [(label, d) for label, d in dirs if d is not None and d.is_dir()]


def _find_config(ckpt: _Checkpoint, candidates: list[tuple[str, Path]]) -> tuple[dict[str, Any], str]:
    for label, directory in candidates:
        data = _read_json(directory / CONFIG)
        if data is not None and "model_type" in data:
            return data, f"{label} ({directory / CONFIG})"
    raise UserError(
        f"No config.json found for checkpoint {ckpt.path}: not in its hf/ folder (checkpoints "
        f"written by older versions lack it), nor in the run's final/ or base_model/, nor in a "
        f"local model.path.",
        "Copy the model's config.json into the checkpoint's hf/ folder and run again.")


def _copy_tokenizer(candidates: list[tuple[str, Path]], target: Path) -> str | None:
    for label, directory in candidates:
        names = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
        if any(n in names for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                                    "spiece.model")):
            for name in names:
                shutil.copyfile(directory / name, target / name)
            return f"{label} ({directory})"
    return None


def _find_base(ckpt: _Checkpoint, run_dir: Path | None, cfg: dict[str, Any],
               adapter_config: dict[str, Any] | None, explicit: str | Path | None) -> tuple[BaseWeights, str]:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise UserError(f"--base-model {path} is not a directory.")
        return BaseWeights(path.resolve()), f"--base-model ({path})"
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    recorded = (adapter_config or {}).get("base_model_name_or_path") or model_cfg.get("path")
    options: list[tuple[str, Path | None]] = []
    if run_dir is not None:
        options.append(("run base_model/", RunDir(run_dir).base_model))
    options += [("adapter base_model_name_or_path", _local_dir((adapter_config or {}).get("base_model_name_or_path"), run_dir)),
                ("model.path", _local_dir(model_cfg.get("path"), run_dir)),
                ("hub cache", cached_snapshot(recorded))]
    for label, directory in options:
        if directory is not None and directory.is_dir() and any(directory.glob("*.safetensors")):
            return BaseWeights(directory), f"{label} ({directory})"
    raise UserError(
        f"The base weights for checkpoint {ckpt.path} were not found (recorded base: {recorded!r}; "
        f"looked in the run's base_model/, a local model.path and the Hugging Face cache).",
        "Pass --base-model DIR (a Hugging Face model directory with safetensors weights).")


# ---------------------------------------------------------------------------- public
def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"Output directory {out} already exists and is not empty; nothing was written.",
                        "Choose a new --out directory or remove the old one.")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out``; renamed to ``out`` when the block succeeds (after
    checking ``out`` is still free), removed when it fails. Readers never see a half-written
    ``out``, and an existing one is never overwritten."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        check_output_dir(out)  # still free?
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        remove_tree(tmp)
        raise


def consolidate(source: str | Path, out: str | Path, *, dtype: str | None = None, merge_lora: bool = False,
                base_model: str | Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                verify: bool = True) -> Result:
    """Write the model (or adapter) of ``source`` (a checkpoint or run directory) to ``out``."""
    out = Path(out).expanduser()
    check_output_dir(out)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of bf16, fp32, fp16, got {dtype!r}.")
    target_dtype = DTYPES[dtype] if dtype else None
    cast = _cast(target_dtype)

    path = resolve_checkpoint(source)
    ckpt = _Checkpoint(path)
    meta = ckpt.meta
    if verify:
        from automodel_cli.components.checkpoint.load import verify_files

        wanted = {k: v for k, v in meta["files"].items()
                  if k.startswith((f"{layout.MODEL_DIR}/", f"{layout.HF_DIR}/"))}
        verify_files(path, {**meta, "files": wanted})
    run_dir = run_dir_of(path)
    cfg = run_config(run_dir)
    candidates = _candidate_dirs(ckpt, run_dir, cfg)
    peft = meta.get("peft")
    adapter_config = _read_json(path / layout.HF_DIR / ADAPTER_CONFIG) if peft else None
    if peft and adapter_config is None:
        raise UserError(f"Checkpoint {path} is a PEFT checkpoint but its {layout.HF_DIR}/{ADAPTER_CONFIG} is missing.")
    if peft and any(("lora_embedding_" in k or ".lora_bias" in k) for k in ckpt.infos) and merge_lora:
        raise UserError("Merging LoRA on embedding layers or LoRA biases is not supported here.",
                        "Export the adapter without --merge-lora and merge with peft's merge_and_unload.")

    result = Result(checkpoint=path, out=out, step=int(meta.get("step", -1)),
                    kind="adapter" if peft and not merge_lora else ("merged" if peft else "model"))
    if merge_lora and not peft:
        result.notes.append("--merge-lora ignored: the checkpoint holds a full model, not an adapter")

    config: dict[str, Any] | None = None
    if result.kind == "adapter":
        outputs = _plan_adapter(ckpt, peft.get("adapter_name", "default"), cast)
        weights_prefix = "adapter_model"
    else:
        config, result.config_source = _find_config(ckpt, candidates if not peft else
                                                    [c for c in candidates if c[0] != "run final/"])
        if peft or meta.get("trainable_only"):
            base, result.base_source = _find_base(ckpt, run_dir, cfg, adapter_config, base_model)
            outputs = _plan_overlay(ckpt, base, cast, peft=peft, adapter_config=adapter_config)
        else:
            outputs = _plan_full(ckpt, config, cast)
        weights_prefix = "model"

    with staged_output(out) as tmp:
        shards = plan_shards([Entry(o.name, o.dtype, o.shape) for o in outputs], max_shard_bytes,
                             prefix=weights_prefix)
        by_name = {o.name: o for o in outputs}
        for file, entries in shards:
            writer = StreamingWriter(tmp / file, entries, metadata={"format": "pt"})
            try:
                for entry in entries:
                    tensor = by_name[entry.name].produce()
                    if tensor.dtype != entry.dtype:
                        tensor = tensor.to(entry.dtype)
                    writer.write(entry.name, tensor)
                    del tensor
            except BaseException:
                writer.abort()
                raise
            writer.close()
            result.files.append(file)
        write_index(tmp, shards, prefix=weights_prefix)
        result.tensors = len(outputs)
        result.bytes = sum(e.nbytes for _, group in shards for e in group)
        _write_side_files(tmp, result, ckpt, config, adapter_config, candidates, run_dir, target_dtype)
    return result


def _write_side_files(tmp: Path, result: Result, ckpt: _Checkpoint, config: dict[str, Any] | None,
                      adapter_config: dict[str, Any] | None, candidates: list[tuple[str, Path]],
                      run_dir: Path | None, dtype: torch.dtype | None) -> None:
    hf = ckpt.path / layout.HF_DIR
    if result.kind == "adapter":
        data = dict(adapter_config or {})
        recorded = data.get("base_model_name_or_path")
        if run_dir is not None and (RunDir(run_dir).base_model).is_dir() and not _local_dir(recorded, run_dir):
            # trained from scratch: the random base weights live beside the run
            data["base_model_name_or_path"] = str((RunDir(run_dir).base_model).resolve())
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        result.config_source = f"checkpoint hf/ ({hf / ADAPTER_CONFIG})"
    else:
        data = dict(config or {})
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            data["dtype"] = name
            if "torch_dtype" in data:
                data["torch_dtype"] = name
        if ckpt.meta.get("hf_architecture") and not data.get("architectures"):
            data["architectures"] = [ckpt.meta["hf_architecture"]]
        (tmp / CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for label, directory in candidates:
            if (directory / GENERATION_CONFIG).is_file():
                shutil.copyfile(directory / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
                break
    result.tokenizer_source = _copy_tokenizer(candidates, tmp)
    if result.tokenizer_source is None:
        result.notes.append("no tokenizer found (pass tokenizer= to save_checkpoint to store one); "
                            "the output has none")
    if hf.is_dir():  # extra files the run stored for export (chat templates, notes, ...)
        skip = {CONFIG, GENERATION_CONFIG, ADAPTER_CONFIG, *TOKENIZER_FILES}
        for file in sorted(hf.rglob("*")):
            relative = file.relative_to(hf)
            if file.is_file() and str(relative) not in skip and not (tmp / relative).exists():
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, tmp / relative)
