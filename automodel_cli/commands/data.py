"""``automodel data pretokenize``: tokenise a text corpus once, in parallel, before training.

Mounted by the main app as ``app.add_typer(data_app, name="data")``. The output directory is a
cache that ``automodel pretrain data.path=DIR`` reads memory-mapped (every rank, no tokenising):
``tokens.npy`` (all documents end to end, int32), ``documents.npy`` (where each document
starts) and ``pretokenized.json`` (source, tokenizer and counts). Documents are encoded exactly
as pretrain encodes text on the fly, so a run gives the same blocks from the cache as from the
text (components/data/text.py). The directory is written under a temporary name and renamed
when complete, so an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import typer

data_app = typer.Typer(help="Prepare training data: tokenise text corpora once, before training.",
                       no_args_is_help=True)


@data_app.command("pretokenize")
def pretokenize_command(
    path: str = typer.Argument(..., help="Text: a .txt/.jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset id.",
                               show_default=False),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Tokenizer directory, hub id or model preset (e.g. llama3, demo)."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the tokenised data (must not exist or be empty)."),
    num_proc: int = typer.Option(1, "--num-proc", "-j", min=1, help="Tokenising processes."),
    split: str = typer.Option("train", "--split", help="Split of a hub dataset (or a directory with split-named files)."),
    text_column: str = typer.Option("text", "--text-column", help="Column holding the documents (.txt files: paragraphs)."),
    option: list[str] = typer.Option([], "--option", help="KEY=VALUE passed to datasets.load_dataset (e.g. sample_by=line); repeatable."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow tokenizer code shipped with a hub repo."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Tokenise PATH with TOKENIZER into OUT (progress bar on stderr); train with data.path=OUT."""
    from automodel_cli.components.checkpoint.consolidate import check_output_dir, staged_output
    from automodel_cli.components.data.text import (load_text, require_text_column, save_pretokenized,
                                                    tokenize_corpus, tokenizer_fingerprint)
    from automodel_cli.components.models.loading import load_tokenizer
    from automodel_cli.components.models.model_files import Role
    from automodel_cli.errors import UserError
    from automodel_cli.plugin_host import get_registries

    out = out.expanduser()
    check_output_dir(out)
    options = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r} is not KEY=VALUE.", "Write it like --option sample_by=line.")
        options[key] = value
    # Messages name this command's own options, not config keys.
    option_names = Role(name="tokenizer", path_key="--tokenizer", tokenizer_key="--tokenizer",
                        trust_setting="--trust-remote-code", from_scratch_key=None)
    presets = get_registries().models
    source = presets.get(tokenizer).metadata["path"] if tokenizer in presets else tokenizer
    tok = load_tokenizer(SimpleNamespace(tokenizer=source, path=source, revision=None, chat_template=None,
                                         trust_remote_code=trust_remote_code, role=option_names))
    table = load_text(path, split, options)
    require_text_column(table, text_column, path)
    arrays = tokenize_corpus(table, tok, text_column, num_proc)
    if arrays.n_tokens == 0:
        raise UserError(f"The text data `{path}` is empty: every document in it is blank; nothing was written.",
                        "Point PATH at files with text in them.")
    meta = {"source": {"path": path, "split": split, "text_column": text_column, "options": options},
            "tokenizer": source, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    with staged_output(out) as staging:
        meta = save_pretokenized(arrays, staging, meta)
    if as_json:
        typer.echo(json.dumps({"out": str(out), **meta}, indent=2))
        return
    typer.echo(f"wrote {meta['documents']} documents, {meta['tokens']} tokens ({source} tokenizer) to {out}")
    typer.echo(f"  train on it with: automodel pretrain ... data.path={out}")
