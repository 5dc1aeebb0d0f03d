"""From config to ready-to-collate SFT samples: load, split, tokenise, mask, pack."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.errors import UserError


@dataclass
class SFTData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    eval_collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    #: Tokens per training sample (no padding): for length grouping and tokens/s.
    train_lengths: list[int] = field(default_factory=list)
    #: Trained (label) tokens per training sample, so every rank knows a step's total.
    train_label_tokens: list[int] = field(default_factory=list)

    def eval_batches(self, batch_size: int, max_batches: int | None) -> Iterator[dict[str, Any]]:
        """Validation batches of similar-length samples, in a fixed order."""
        order = sorted(range(len(self.eval)), key=lambda i: (len(self.eval[i]["input_ids"]), i))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.eval_collate([self.eval[i] for i in chunk])


def dataset_options(cfg: Any, registries: Any, name: str) -> dict[str, Any]:
    """What a dataset factory gets as ``options``: ``data.options`` (keyword arguments for
    ``datasets.load_dataset``) and the dataset's own declared options (``data.NAME``)."""
    from automodel_cli.config.compose import entry_options

    return {**cfg.data.options.to_dict(), **entry_options(cfg, registries.datasets, name)}


def _dataset_name(cfg: Any) -> str:
    name = cfg.data.name
    if name == "auto":
        if not cfg.data.path:
            raise UserError(
                "No training data given.",
                "Set data.path to a jsonl/json/parquet/csv file or a hub dataset id, or "
                "data.name to a registered dataset (`automodel list datasets`).",
            )
        name = "instruction"
    return name


def _load_tables(cfg: Any, registries: Any) -> tuple[Any, Any | None]:
    name = _dataset_name(cfg)
    factory = registries.datasets.get(name).load()
    options = dataset_options(cfg, registries, name)
    train = factory(cfg.data.path, cfg.data.split, options)
    evaluation = None
    if cfg.data.eval_path:
        evaluation = factory(cfg.data.eval_path, cfg.data.eval_split or "train", options)
    elif cfg.data.eval_split:
        evaluation = factory(cfg.data.path, cfg.data.eval_split, options)
    size = cfg.data.eval_size
    if size and evaluation is None:
        if isinstance(size, float) and not 0 < size < 1:
            raise UserError(f"data.eval_size={size} must be a fraction between 0 and 1 or a sample count.")
        split = train.train_test_split(test_size=size, seed=cfg.train.seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    return train, evaluation


def _tokenize(table: Any, tokenizer: Any, cfg: Any, say: Callable[[str], None], what: str) -> Any:
    from automodel_cli.components.data import tokenize_sft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenized, stats = tokenize_sft(
            table, tokenizer,
            prompt_column=cfg.data.prompt_column, completion_column=cfg.data.completion_column,
            messages_column=cfg.data.messages_column, max_length=cfg.data.max_length,
            chat_template=cfg.model.chat_template,
        )
    for warning in caught:
        say(f"warning ({what} data): {warning.message}")
    say(f"{what} data: {stats.n_samples} samples, {stats.n_tokens} tokens, "
        f"{stats.n_trainable_tokens} trained tokens, {stats.n_truncated} truncated")
    return tokenized


def _samples(tokenized: Any) -> list[dict[str, Any]]:
    return [{"input_ids": ids, "labels": labels}
            for ids, labels in zip(tokenized["input_ids"], tokenized["labels"])]


def prepare_sft_data(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                     pad_to_multiple_of: int | None = None) -> SFTData:
    """``pad_to_multiple_of``: sequence parallelism splits the sequence over the tensor-parallel
    ranks, so batches are padded to a multiple of that degree."""
    from automodel_cli.components.data import IGNORE_INDEX, SFTCollator, pack_sequences, padding_fraction

    train_table, eval_table = _load_tables(cfg, registries)
    train = _samples(_tokenize(train_table, tokenizer, cfg, say, "train"))
    evaluation = _samples(_tokenize(eval_table, tokenizer, cfg, say, "eval")) if eval_table is not None else []
    pad_id = tokenizer.pad_token_id
    if cfg.data.packing:
        packs = pack_sequences([s["input_ids"] for s in train], [s["labels"] for s in train], cfg.data.max_length)
        say(f"packing: {len(train)} samples into {len(packs)} sequences of up to "
            f"{cfg.data.max_length} tokens ({padding_fraction(packs, cfg.data.max_length):.1%} padding)")
        train = packs
    lengths = [len(s["input_ids"]) for s in train]
    return SFTData(
        train=train,
        eval=evaluation,
        # Flash attention finds document boundaries from position ids only in a batch of one
        # row, so packs are laid end to end there; sdpa/eager get a block-diagonal mask instead.
        collate=SFTCollator(pad_id, packed=cfg.data.packing, pad_to_multiple_of=pad_to_multiple_of,
                            flatten=cfg.data.packing and str(cfg.model.attn_implementation or "").startswith("flash")),
        eval_collate=SFTCollator(pad_id, packed=False, pad_to_multiple_of=pad_to_multiple_of),
        train_lengths=lengths,
        train_label_tokens=[sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in train],
    )
