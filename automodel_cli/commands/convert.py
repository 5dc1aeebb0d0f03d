"""``automodel convert dtype|merge-lora|hf-to-checkpoint|checkpoint-to-hf``: convert model formats.

Mounted by the main app as ``app.add_typer(convert_app, name="convert")``. Every command writes
into a temporary sibling of ``--out`` and renames it into place at the end, so a failure never
leaves a half-written output; an existing non-empty ``--out`` is refused and never touched.
Problems a user can fix are ``UserError``s: printed as one ``error: ...`` line, exit code 2.

Nothing heavy (torch, transformers, peft) is imported at module level, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from automodel_cli.components.models.adapters import ADAPTER_CONFIG
from automodel_cli.errors import UserError

convert_app = typer.Typer(
    help="Convert models: change dtype, merge a LoRA adapter, HF directory <-> sharded checkpoint.",
    no_args_is_help=True,
)

DTYPE_CHOICES = ("bf16", "fp16", "fp32")
DTYPE_HELP = "bf16, fp16 or fp32 (floating-point tensors only; integer tensors are kept)."
CONFIG = "config.json"
#: Files never copied as "side files" from a source model directory: the weights themselves.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def _user_errors(function: Callable[..., None]) -> Callable[..., None]:
    """Print a ``UserError`` as the main CLI does (``error: ...`` on stderr) and exit 2, also
    when the sub-app runs on its own (``typer.testing.CliRunner``)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error.render()}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


# ------------------------------------------------------------------------------ checks
def _source_dir(path: Path, what: str, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} does not exist.", hint)
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory.", hint)
    return path.resolve()


def _hf_source(path: Path) -> Path:
    hint = "Pass a Hugging Face model directory (config.json + *.safetensors, as save_pretrained writes)."
    src = _source_dir(path, "Source model directory", hint)
    if not any(src.glob("*.safetensors")):
        extra = " (it has PyTorch .bin weights; re-save it with safe_serialization=True)" \
            if any(src.glob("*.bin")) else ""
        raise UserError(f"Source model directory {src} has no *.safetensors weights{extra}.", hint)
    if not (src / CONFIG).is_file():
        if (src / ADAPTER_CONFIG).is_file():
            hint = "It is a peft adapter: write a full model first with `automodel convert merge-lora`."
        raise UserError(f"Source model directory {src} has no {CONFIG}.", hint)
    return src


def _check_dtype(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    key = dtype.strip().lower()
    if key not in DTYPE_CHOICES:
        raise UserError(f"--dtype {dtype!r} is not a supported dtype.", f"Use one of {', '.join(DTYPE_CHOICES)}.")
    return key


def _check_out(out: Path) -> Path:
    from automodel_cli.components.checkpoint.consolidate import check_output_dir

    out = Path(out).expanduser()
    check_output_dir(out)
    return out


def _staging(out: Path):
    """Write into a temporary sibling of ``out`` and rename it into place on success."""
    from automodel_cli.components.checkpoint.consolidate import staged_output

    return staged_output(out)


def _side_files(directory: Path) -> list[Path]:
    """Top-level files of a model directory other than weights: config, generation config,
    tokenizer, chat template, README, custom code..."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES))


def _dtype_name(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


def _write_config(src: Path, dst: Path, dtype: str | None) -> None:
    data = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    if dtype is not None:  # as `checkpoint consolidate --dtype` does
        data["dtype"] = _dtype_name(dtype)
        if "torch_dtype" in data:
            data["torch_dtype"] = _dtype_name(dtype)
    (dst / CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- dtype
def convert_dtype(src: Path, dst: Path, dtype: str, max_shard_bytes: int) -> dict[str, Any]:
    """Rewrite the safetensors weights of HF directory ``src`` in ``dtype`` into the (existing,
    empty) directory ``dst``, one tensor in memory at a time; copy the other files."""
    from automodel_cli.components.checkpoint.consolidate import DTYPES, BaseWeights
    from automodel_cli.components.checkpoint.safetensors_stream import (
        Entry,
        StreamingWriter,
        plan_shards,
        write_index,
    )

    target = DTYPES[dtype]
    weights = BaseWeights(src)
    entries = []
    for name in weights.keys():
        stored, shape = weights.entry(name)
        entries.append(Entry(name, target if stored.is_floating_point else stored, shape))
    shards = plan_shards(entries, max_shard_bytes, prefix="model")
    for file, group in shards:
        writer = StreamingWriter(dst / file, group, metadata={"format": "pt"})
        try:
            for entry in group:
                tensor = weights.read(entry.name)
                writer.write(entry.name, tensor.to(entry.dtype))
                del tensor
        except BaseException:
            writer.abort()
            raise
        writer.close()
    write_index(dst, shards, prefix="model")
    for file in _side_files(src):
        if file.name != CONFIG:
            shutil.copyfile(file, dst / file.name)
    _write_config(src, dst, dtype)
    return {"tensors": len(entries), "bytes": sum(e.nbytes for e in entries), "files": [f for f, _ in shards]}


@convert_app.command("dtype")
@_user_errors
def dtype_command(
    source: Path = typer.Argument(..., help="Hugging Face model directory with *.safetensors weights.",
                                  show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the converted model (must not exist or be empty)."),
    dtype: str = typer.Option(..., "--dtype", help=DTYPE_HELP),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Split weights into files of at most this size."),
) -> None:
    """Rewrite a Hugging Face model's weights in another dtype, one tensor at a time.

    Config (with its dtype updated), generation config, tokenizer and other non-weight files
    are copied.
    """
    from automodel_cli.commands.checkpoint import parse_size
    from automodel_cli.components.checkpoint.describe import human_size

    dtype = _check_dtype(dtype)
    limit = parse_size(max_shard_size)
    src = _hf_source(source)
    out = _check_out(out)
    with _staging(out) as tmp:
        info = convert_dtype(src, tmp, dtype, limit)
    typer.echo(f"wrote {src} as {_dtype_name(dtype)} to {out}")
    typer.echo(f"  {info['tensors']} tensors, {human_size(info['bytes'])} in {', '.join(info['files'])}")


# ------------------------------------------------------------------------- merge-lora
@convert_app.command("merge-lora")
@_user_errors
def merge_lora_command(
    adapter: Path = typer.Argument(..., help="peft adapter directory (adapter_config.json + adapter weights).",
                                   show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the merged model (must not exist or be empty)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model directory or hub id (default: the adapter's base_model_name_or_path)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"{DTYPE_HELP} Default: as the base model."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Split weights into files of at most this size."),
) -> None:
    """Fold a LoRA/DoRA adapter into its base model and write a plain Hugging Face model.

    Loads base and adapter on CPU (peft's merge_and_unload), so it needs memory for the base model.
    A QLoRA adapter (quantization.json beside it) is merged into the base as its quantized copy
    computes it, the weights it was trained against.
    """
    from automodel_cli.commands.checkpoint import parse_size

    dtype = _check_dtype(dtype)
    limit = parse_size(max_shard_size)
    from automodel_cli.components.models.adapters import ADAPTER_HINT, read_adapter_config, resolve_adapter_base

    adapter = _source_dir(adapter, "Adapter directory", ADAPTER_HINT)
    base_path = resolve_adapter_base(adapter, read_adapter_config(adapter), base)
    out = _check_out(out)

    from automodel_cli.components.models.saving import merge_adapter
    from automodel_cli.components.peft import quantize

    with _staging(out) as tmp:
        merged = tmp / "merged"
        try:
            merge_adapter(base_path, adapter, merged)
        except OSError as exc:  # a hub id that is not in the cache, a directory without weights ...
            raise UserError(f"The base model {base_path!r} cannot be loaded ({str(exc).splitlines()[0]}).",
                            "Pass --base DIR (a Hugging Face model directory with safetensors weights).") from None
        if dtype is not None:
            final = tmp / "final"
            final.mkdir()
            convert_dtype(merged, final, dtype, limit)
        else:
            final = merged
        # tokenizer and other files: from the adapter dir first, then a local base dir
        sources = [adapter] + ([Path(base_path)] if Path(base_path).is_dir() else [])
        for directory in sources:
            for file in _side_files(directory):
                if file.name not in (ADAPTER_CONFIG, quantize.RECORD) and not (final / file.name).exists():
                    shutil.copyfile(file, final / file.name)
        for item in list(final.iterdir()):
            os.replace(item, tmp / item.name)
        shutil.rmtree(merged, ignore_errors=True)
        if final != merged:
            final.rmdir()
    method = quantize.recorded_method(adapter)
    dequantized = f" (its weights as the {method} copy the adapter trained on computes them)" if method else ""
    typer.echo(f"wrote {adapter} merged into {base_path}{dequantized} to {out}")


# ------------------------------------------------------------------ hf <-> checkpoint
@convert_app.command("hf-to-checkpoint")
@_user_errors
def hf_to_checkpoint_command(
    source: Path = typer.Argument(..., help="Hugging Face model directory with *.safetensors weights.",
                                  show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="New checkpoint directory (must not exist or be empty)."),
) -> None:
    """Write a Hugging Face model as a sharded training checkpoint (format 2, no optimizer state).

    The checkpoint (meta.json, model/ as DCP with the model's parameter names, hf/ with config
    and tokenizer) works with `checkpoint inspect`, `checkpoint consolidate` and
    `convert checkpoint-to-hf`.
    """
    src = _hf_source(source)
    out = _check_out(out)

    import torch

    from automodel_cli.components.checkpoint.save import write_payload
    from automodel_cli.components.models.vlm import auto_class

    try:
        config = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{src / CONFIG} cannot be read ({exc}).",
                        "Pass a model directory whose config.json is valid JSON.") from None
    model_class = auto_class(config)  # a vision-language model's is AutoModelForImageTextToText
    try:
        model = model_class.from_pretrained(src, dtype="auto")
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"Model directory {src} cannot be loaded with {model_class.__name__} "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).",
                        "Pass a causal language model or vision-language model directory that "
                        "from_pretrained loads.") from None
    state = json.dumps({"step": 0, "converted_from": str(src)}, indent=2, sort_keys=True)
    extra = {f.name: f.read_bytes() for f in _side_files(src) if f.name != CONFIG}
    with _staging(out) as tmp, torch.no_grad():
        write_payload(tmp, 0, model=model, optimizer=None, scheduler=None, state_json=state,
                      generators=None, tokenizer=None, extra_files=extra)
    typer.echo(f"wrote {src} as a checkpoint (step 0, no optimizer state) to {out}")


def _checkpoint_to_hf() -> Callable[..., None]:
    from automodel_cli.commands.checkpoint import consolidate_command

    return _user_errors(consolidate_command)


convert_app.command(
    "checkpoint-to-hf",
    help="Write a checkpoint as a Hugging Face model directory: the same as `automodel checkpoint consolidate`.",
)(_checkpoint_to_hf())
