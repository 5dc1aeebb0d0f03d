"""``automodel checkpoint consolidate|inspect``: work with training checkpoints.

Mounted by the main app as ``app.add_typer(checkpoint_app, name="checkpoint")``. Problems a
user can fix (a path that is not a checkpoint, a damaged file, an output directory that is in
the way) are raised as ``UserError`` and printed by the CLI without a traceback (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

checkpoint_app = typer.Typer(
    help="Inspect training checkpoints and export them as Hugging Face models.",
    no_args_is_help=True,
)

SOURCE_HELP = "A checkpoint directory (checkpoints/step_XXXXXXXX) or a run directory (uses its latest checkpoint)."


@checkpoint_app.command("consolidate")
def consolidate_command(
    source: Path = typer.Argument(..., help=SOURCE_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the Hugging Face model (must not exist or be empty)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating-point tensors: bf16, fp32 or fp16 (default: as saved)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Fold a LoRA/DoRA adapter into the base weights and write a full model."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="Base model directory for --merge-lora (default: found from the run)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Split weights into files of at most this size (e.g. 5GB, 500MB)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the sha256 of every weight file before reading."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a checkpoint as a Hugging Face model directory (or a peft adapter directory).

    Tensors are streamed one at a time, so memory stays near the largest tensor whatever the
    model size and however many ranks saved the checkpoint.
    """
    from automodel_cli.components.checkpoint.consolidate import consolidate
    from automodel_cli.components.checkpoint.describe import human_size

    refuse_run_without_checkpoints(source, "consolidate")
    result = consolidate(source, out, dtype=dtype, merge_lora=merge_lora, base_model=base_model,
                         max_shard_bytes=parse_size(max_shard_size), verify=verify)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    what = {"model": "model", "adapter": "peft adapter", "merged": "merged model (LoRA folded in)"}[result.kind]
    typer.echo(f"wrote {what} from step {result.step} ({result.checkpoint}) to {result.out}")
    typer.echo(f"  {result.tensors} tensors, {human_size(result.bytes)} in {', '.join(result.files)}")
    typer.echo(f"  config:    {result.config_source}")
    typer.echo(f"  tokenizer: {result.tokenizer_source or 'none'}")
    if result.base_source:
        typer.echo(f"  base:      {result.base_source}")
    for note in result.notes:
        typer.echo(f"  note: {note}")


@checkpoint_app.command("inspect")
def inspect_command(
    source: Path = typer.Argument(..., help=SOURCE_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every file's size and sha256."),
) -> None:
    """Show a checkpoint's step, world size and mesh, tensors (dtype, shape, size) and train state."""
    from automodel_cli.components.checkpoint.describe import describe, render

    refuse_run_without_checkpoints(source, "inspect")
    info = describe(source, verify=verify)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        typer.echo(render(info), nl=False)


def refuse_run_without_checkpoints(source: Path, verb: str) -> None:
    """A run directory that saved no checkpoint: explain what it holds instead of "not a checkpoint"."""
    from automodel_cli.components.checkpoint import layout
    from automodel_cli.run_layout import RunDir
    from automodel_cli.errors import UserError

    source = Path(source)
    is_run = RunDir(source).holds_run()
    if not is_run or layout.is_checkpoint_dir(source) or layout.list_checkpoints(layout.checkpoints_root(source)):
        return
    final = RunDir(source).final
    has_final = (final / "config.json").exists() or (final / "adapter_config.json").exists()
    held = (f"Its final/ directory is already a Hugging Face {'adapter' if (final / 'adapter_config.json').exists() else 'model'} "
            f"directory: load it with from_pretrained, or pass model.path={final}; there is nothing to {verb}."
            if has_final else "It has no final/ output either (the run did not finish).")
    raise UserError(
        f"`{source}` is a run directory without checkpoints (the run saved none). {held}",
        "Runs save resumable checkpoints under checkpoints/ when started with checkpoint.every_steps=N "
        "(also on SIGTERM/SIGINT); those are what `automodel checkpoint` inspects and consolidates.",
    )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` -> 5_000_000_000 (as ``save_pretrained``'s max_shard_size), ``500MiB``, ``1024``."""
    from automodel_cli.errors import UserError

    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size.", "Use e.g. 5GB, 500MB or 2GiB.")
    return int(value * _UNITS[unit])
