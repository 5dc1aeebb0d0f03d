"""Text corpora for pre-training: documents -> one token stream -> fixed-length blocks.

    table = load_text("corpus/", split="train", options={}, streaming=False)   # datasets table
    require_text_column(table, "text", "corpus/")
    tokens = tokenize_corpus(table, tokenizer, "text", num_proc=4)              # TokenArrays
    blocks = TokenBlocks(tokens, block_size=2048)          # blocks[i]: one block (numpy arrays)
    stream = BlockStream(document_reader(table, tokenizer, "text"), 2048)       # same blocks, lazily
    save_pretokenized(tokens, out, meta); load_pretokenized(out)                # the cache

Documents. Each text becomes ``[BOS] + tokens + [EOS]`` (BOS only when the tokenizer has one
that differs from EOS); empty texts are skipped. ``.txt`` files are read with one document per
paragraph (blank-line separated; ``data.options.sample_by`` may say ``line`` or ``document``);
jsonl/json/parquet/csv files and hub datasets have one document per row in a text column.

Blocks. The documents are laid end to end in order and the stream is cut every ``block_size``
tokens; a tail shorter than a block is dropped (per pass over the data). A document may run
across a block border. Inside a block the position ids restart at 0 wherever a document starts
(and at the block start), and the label of a document's first token is -100, so nothing is
predicted across a document border; with no attention mask transformers turns the position
resets into a block-diagonal causal mask for sdpa/eager/flex and into varlen boundaries for
flash attention (packing.py explains the mechanism, finetune packing relies on the same).

``TokenBlocks`` indexes blocks of an in-memory or memory-mapped token array (random access, so
a shuffled order is a pure function of the seed). ``BlockStream`` produces exactly the same
blocks from documents read one by one (streaming datasets), and its ``StreamPosition`` (pass,
document index, tokens of that document already used) lets a resumed run continue at the same
token: the reader skips the consumed documents without tokenising them.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError, did_you_mean

IGNORE_INDEX = -100
PRETOKENIZED_META = "pretokenized.json"
PRETOKENIZED_FORMAT = "automodel-pretokenized"
TOKENS_FILE, STARTS_FILE = "tokens.npy", "documents.npy"

#: Local file suffix -> datasets builder (``.txt`` on top of what finetune's loader reads).
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------------- loading


def load_text(path: str | None, split: str, options: dict[str, Any], streaming: bool = False):
    """One split of a text corpus as a ``datasets.Dataset`` (``IterableDataset`` when
    ``streaming``): a local file or directory (.txt/.jsonl/.json/.parquet/.csv) or a hub id."""
    from automodel_cli.components.data.loading import _looks_local, load_table

    if not path:
        raise UserError("No text data: data.path is not set.",
                        "Set data.path to a .txt/.jsonl/.parquet file, a directory of them, a hub "
                        "dataset id or a directory written by `automodel data pretokenize`.")
    options = dict(options)
    options.pop("streaming", None)
    local = Path(path).expanduser()
    if not local.exists() and not _looks_local(path):
        return _load_hub_text(path, split, options) if streaming else load_table(path, split, options)
    files = _local_files(local, split, path)
    builder = TEXT_BUILDERS[files[0].suffix.lower()]
    if builder != "text" and not streaming:
        return load_table(path, split, options)  # its checks name the bad line of a JSON file
    import datasets

    if builder == "text":
        options.setdefault("sample_by", "paragraph")
    bracket = split.find("[")  # one local table is one split; keep a slice such as [:10%]
    local_split = "train" + (split[bracket:] if bracket >= 0 and not streaming else "")
    try:
        table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split=local_split,
                                      streaming=streaming, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as exc:
        if "corresponds to no data" in str(exc):
            raise _empty_corpus(path) from None
        raise UserError(f"Could not read `{path}` as {builder} ({type(exc).__name__}: {exc}).",
                        "Check the files and data.options (passed to datasets.load_dataset).") from exc
    if not streaming and len(table) == 0:
        raise _empty_corpus(path)
    return table


def _local_files(local: Path, split: str, path: str) -> list[Path]:
    from automodel_cli.components.data.loading import _data_files

    if not local.exists():
        raise UserError(f"Data file `{path}` does not exist (resolved to {local.resolve()}).",
                        "Check data.path.")
    if local.is_file() and local.suffix.lower() not in TEXT_BUILDERS:
        raise UserError(f"Data file `{path}` has an unsupported extension `{local.suffix}`.",
                        "Pre-training reads .txt, .jsonl, .json, .parquet or .csv files.")
    texts = [local] if local.suffix.lower() == ".txt" else sorted(
        f for f in local.rglob("*.txt") if not any(p.startswith(".") for p in f.relative_to(local).parts))
    if texts and local.is_dir():
        others = [f for f in local.rglob("*") if f.suffix.lower() in TEXT_BUILDERS and f.suffix.lower() != ".txt"]
        if others:
            raise UserError(f"Data directory `{path}` mixes .txt files with {others[0].suffix} files.",
                            "Keep one format per directory, or point data.path at a single file.")
    return texts or _data_files(local, split)


def _load_hub_text(path: str, split: str, options: dict[str, Any]):
    import datasets

    from automodel_cli.components.data.loading import _first_line, _hub_errors

    try:
        return datasets.load_dataset(path, split=split, streaming=True, **options)
    except _hub_errors() as exc:
        raise UserError(
            f"Dataset `{path}` could not be streamed from the Hugging Face Hub "
            f"({type(exc).__name__}: {_first_line(exc)}).",
            "Check the id, the split (data.split), your network and HF_TOKEN, or download it and "
            "pass a local file or directory as data.path.",
        ) from exc


def _empty_corpus(path: str) -> UserError:
    return UserError(f"The text data `{path}` is empty: it holds no document.",
                     "Point data.path at files with text in them.")


def column_names(table: Any) -> list[str]:
    """Columns of a Dataset or IterableDataset (peeking at the first row when unknown)."""
    names = table.column_names
    if names is None:
        first = next(iter(table), None)
        names = list(first) if first is not None else []
    return list(names)


def require_text_column(table: Any, column: str, source: str) -> None:
    found = column_names(table)
    if column not in found:
        guess = did_you_mean(column, found) or next(
            (f" Did you mean `{c}`?" for c in found if column.lower() in c.lower()), "")
        raise UserError(
            f"The text data `{source}` has no `{column}` column; its columns are "
            f"{', '.join(found) or 'none'}.{guess}",
            "Set data.text_column to the column that holds the documents' text.",
        )


# ------------------------------------------------------------------------- registered sets


def text_dataset(path: str | None, split: str, options: dict[str, Any]):
    """The ``text`` dataset: documents from data.path (``options["streaming"]`` streams)."""
    return load_text(path, split, options, streaming=bool(options.get("streaming")))


def demo_text(path: str | None, split: str, options: dict[str, Any]):
    """The bundled pre-training demo corpus: ``train`` reads train.txt; ``validation``,
    ``eval`` or ``test`` read validation.txt. ``path`` may point at a regenerated copy."""
    from automodel_cli.assets import pretrain_demo_dir

    root = Path(path).expanduser() if path else pretrain_demo_dir()
    if not (root / "train.txt").is_file():
        raise UserError(
            f"data.name=demo (the pre-training demo corpus) reads a directory holding train.txt and "
            f"validation.txt, and `{path}` is not one.",
            "To pre-train on your own text set data.name=text (and data.eval_split=null, or "
            "data.eval_path=... for validation text).",
        )
    base = split.split("[")[0]
    files = {"train": "train.txt", "validation": "validation.txt", "eval": "validation.txt",
             "test": "validation.txt"}
    if base not in files:
        raise UserError(f"The demo-text dataset has no split `{split}`.",
                        "Use data.split=train (train.txt) or validation (validation.txt).")
    return load_text(str(root / files[base]), "train" + split[len(base):], options,
                     streaming=bool(options.get("streaming")))


# ------------------------------------------------------------------------------ tokenising


class DocumentEncoder:
    """Texts -> token ids of whole documents (BOS + text + EOS); [] for an empty text."""

    def __init__(self, tokenizer: Any):
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if eos is None:
            raise UserError(
                "The tokenizer has no end-of-sequence token, which pre-training puts between "
                "documents.",
                "Use a tokenizer with an EOS token (model.tokenizer), or set one in its "
                "tokenizer_config.json.",
            )
        self.tokenizer = tokenizer
        self.prefix = [bos] if bos is not None and bos != eos else []
        self.suffix = [eos]

    def encode(self, texts: list[Any], indices: list[int], column: str) -> list[list[int]]:
        for text, index in zip(texts, indices):
            if text is not None and not isinstance(text, str):
                raise UserError(f"Row {index}: column `{column}` holds {type(text).__name__}, not text.",
                                "Fix that row, or set data.text_column to a text column.")
        keep = [i for i, text in enumerate(texts) if text and text.strip()]
        encoded = self.tokenizer([texts[i] for i in keep], add_special_tokens=False,
                                 verbose=False)["input_ids"] if keep else []
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(keep, encoded):
            out[i] = self.prefix + list(ids) + self.suffix
        return out


@dataclass
class TokenArrays:
    """All documents of a corpus end to end: ``tokens`` (int32) and ``starts`` (int64, the
    offset of every document plus the total at the end)."""

    tokens: Any
    starts: Any

    @property
    def n_documents(self) -> int:
        return len(self.starts) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def tokenize_corpus(table: Any, tokenizer: Any, column: str, num_proc: int | None = None) -> TokenArrays:
    """Tokenise a (map-style) table with ``datasets.map`` (``num_proc`` processes, cached by
    datasets) into ``TokenArrays``."""
    import numpy as np
    import pyarrow.compute as pc

    encoder = DocumentEncoder(tokenizer)

    def process(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {"input_ids": [ids for ids in encoder.encode(batch[column], indices, column) if ids]}

    mapped = table.map(process, batched=True, with_indices=True, remove_columns=table.column_names,
                       num_proc=num_proc if num_proc and num_proc > 1 else None,
                       desc="Tokenising text")
    if len(mapped) == 0:  # every text was blank
        return TokenArrays(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
    if mapped._indices is not None:
        mapped = mapped.flatten_indices()
    ids = mapped.data.column("input_ids")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return TokenArrays(tokens, starts)


# --------------------------------------------------------------------------------- blocks


def make_block(ids: Any, starts: Any) -> dict[str, Any]:
    """One block from its token ids and the offsets (> 0) inside it where documents start."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    marker = np.zeros(len(ids), dtype=np.int64)
    marker[starts] = starts
    labels = ids.copy()
    labels[starts] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels,
            "position_ids": np.arange(len(ids)) - np.maximum.accumulate(marker),
            "label_tokens": len(ids) - 1 - len(starts)}


class TokenBlocks:
    """Random access to the blocks of ``TokenArrays``: block ``i`` holds tokens
    ``[i * block_size, (i + 1) * block_size)``. ``first``/``count`` select a range of blocks."""

    def __init__(self, arrays: TokenArrays, block_size: int, first: int = 0, count: int | None = None):
        self.arrays = arrays
        self.block_size = block_size
        available = arrays.n_tokens // block_size
        self.first = first
        self.count = available - first if count is None else count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        if not 0 <= index < self.count:
            raise IndexError(index)
        lo = (self.first + index) * self.block_size
        hi = lo + self.block_size
        starts = self.arrays.starts
        inside = starts[np.searchsorted(starts, lo, side="right"):np.searchsorted(starts, hi, side="left")]
        return make_block(self.arrays.tokens[lo:hi], inside - lo)

    def split_tail(self, count: int) -> tuple[TokenBlocks, TokenBlocks]:
        """(all but the last ``count`` blocks, the last ``count`` blocks)."""
        head = TokenBlocks(self.arrays, self.block_size, self.first, self.count - count)
        return head, TokenBlocks(self.arrays, self.block_size, self.first + self.count - count, count)


@dataclass
class StreamPosition:
    """Where a ``BlockStream`` is: the next token is token ``offset`` of document ``document``
    in pass ``epoch``; ``blocks`` blocks were handed out so far."""

    epoch: int = 0
    document: int = 0
    offset: int = 0
    blocks: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: ``open_documents(start)`` yields the token ids of documents ``start, start + 1, ...``.
DocumentOpener = Callable[[int], Iterator[list[int]]]


def document_reader(table: Any, tokenizer: Any, column: str, batch_size: int = 256) -> DocumentOpener:
    """Documents of a (streaming) table, tokenised ``batch_size`` texts at a time."""
    encoder = DocumentEncoder(tokenizer)
    table = table.select_columns([column])

    def open_documents(start: int) -> Iterator[list[int]]:
        rows = table.skip(start) if start else table  # skipped rows are not tokenised
        texts: list[Any] = []
        for row in rows:
            texts.append(row[column])
            if len(texts) == batch_size:
                yield from encoder.encode(texts, list(range(start, start + len(texts))), column)
                start, texts = start + len(texts), []
        yield from encoder.encode(texts, list(range(start, start + len(texts))), column)

    return open_documents


class BlockStream:
    """The blocks of ``TokenBlocks`` over the same documents, produced while reading them in
    order; each pass ends by dropping its tail, as ``TokenBlocks`` does, and starts again."""

    def __init__(self, open_documents: DocumentOpener, block_size: int,
                 position: StreamPosition | None = None, source: str = "the text data"):
        self.open_documents = open_documents
        self.block_size = block_size
        self.source = source
        self._one_pass = False
        self.seek(position or StreamPosition())

    def seek(self, position: StreamPosition) -> None:
        """Continue from ``position`` (as saved in a checkpoint's train state)."""
        self._epoch, self._blocks = position.epoch, position.blocks
        self._next_document, self._skip = position.document, position.offset
        self._documents = self.open_documents(position.document)
        self._pieces: deque[list[Any]] = deque()  # [document, used, ids]
        self._buffered = 0

    @property
    def position(self) -> StreamPosition:
        if self._pieces:
            document, used, _ = self._pieces[0]
            return StreamPosition(self._epoch, document, used, self._blocks)
        return StreamPosition(self._epoch, self._next_document, self._skip, self._blocks)

    def _fill(self) -> None:
        while self._buffered < self.block_size:
            ids = next(self._documents, None)
            if ids is None:
                self._next_pass()
                continue
            document, used = self._next_document, self._skip
            self._next_document, self._skip = document + 1, 0
            if len(ids) > used:
                self._pieces.append([document, used, ids])
                self._buffered += len(ids) - used

    def _next_pass(self) -> None:
        if self._blocks == 0:  # a whole pass without one block: the corpus is too small
            raise UserError(
                f"{self.source} holds fewer tokens than one block of {self.block_size} "
                f"(data.max_length), so there is nothing to train on.",
                "Add text, or lower data.max_length.",
            )
        if self._one_pass:
            raise _EndOfPass
        self.seek(StreamPosition(self._epoch + 1, 0, 0, self._blocks))

    def next_block(self) -> dict[str, Any]:
        self._fill()
        ids: list[int] = []
        starts: list[int] = []
        while len(ids) < self.block_size:
            piece = self._pieces[0]
            _, used, doc = piece
            if used == 0 and ids:
                starts.append(len(ids))
            take = min(self.block_size - len(ids), len(doc) - used)
            ids.extend(doc[used:used + take])
            piece[1] = used + take
            if piece[1] == len(doc):
                self._pieces.popleft()
        self._buffered -= self.block_size
        self._blocks += 1
        return make_block(ids, starts)

    def take(self, count: int) -> list[dict[str, Any]]:
        return [self.next_block() for _ in range(count)]

    def take_one_pass(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` blocks, stopping at the end of the data (for validation sets)."""
        blocks: list[dict[str, Any]] = []
        self._one_pass = True
        try:
            while limit is None or len(blocks) < limit:
                blocks.append(self.next_block())
        except _EndOfPass:
            pass
        finally:
            self._one_pass = False
        return blocks


class _EndOfPass(Exception):
    pass


def collate_blocks(blocks: list[dict[str, Any]], flatten: bool = False) -> dict[str, Any]:
    """Stack equal-length blocks into tensors (no padding, no attention mask: position ids mark
    the documents). ``flatten`` lays them end to end in one row, which flash attention needs to
    see the document borders (see collate.py)."""
    import numpy as np
    import torch

    batch = {key: torch.from_numpy(np.stack([b[key] for b in blocks]))
             for key in ("input_ids", "labels", "position_ids")}
    if flatten:
        batch = {key: value.reshape(1, -1) for key, value in batch.items()}
    batch["num_label_tokens"] = sum(int(b["label_tokens"]) for b in blocks)
    return batch


# ----------------------------------------------------------------------------- the cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary and rules, to tell whether a cache fits a model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256((text + json.dumps(specials)).encode()).hexdigest()


def is_pretokenized(path: str | None) -> bool:
    return bool(path) and (Path(path).expanduser() / PRETOKENIZED_META).is_file()


def save_pretokenized(arrays: TokenArrays, directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``tokens.npy``, ``documents.npy`` and ``pretokenized.json`` (last) into an empty
    ``directory``; returns the metadata written."""
    import numpy as np

    np.save(directory / TOKENS_FILE, arrays.tokens)
    np.save(directory / STARTS_FILE, arrays.starts)
    meta = {"format": PRETOKENIZED_FORMAT, "version": 1, "documents": arrays.n_documents,
            "tokens": arrays.n_tokens, **meta}
    (directory / PRETOKENIZED_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_pretokenized(path: str, tokenizer: Any) -> tuple[TokenArrays, dict[str, Any]]:
    """Memory-map a cache written by ``automodel data pretokenize``; it must have been made
    with the same tokenizer."""
    import numpy as np

    directory = Path(path).expanduser()
    try:
        meta = json.loads((directory / PRETOKENIZED_META).read_text())
        arrays = TokenArrays(np.load(directory / TOKENS_FILE, mmap_mode="r"),
                             np.load(directory / STARTS_FILE, mmap_mode="r"))
    except (OSError, ValueError) as exc:
        raise UserError(f"The pre-tokenised data `{path}` is damaged ({type(exc).__name__}: {exc}).",
                        "Write it again with `automodel data pretokenize`.") from exc
    if meta.get("format") != PRETOKENIZED_FORMAT:
        raise UserError(f"`{path}/{PRETOKENIZED_META}` is not an automodel pre-tokenised data set.",
                        "Write it with `automodel data pretokenize`.")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"The pre-tokenised data `{path}` was made with tokenizer `{meta.get('tokenizer')}`, "
            f"which differs from this run's tokenizer.",
            "Pre-tokenise again with --tokenizer set to this model's tokenizer, or set "
            "model.tokenizer to the one the data was made with.",
        )
    return arrays, meta
