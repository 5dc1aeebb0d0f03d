"""From config to the blocks a pre-training run reads (components/data/text.py does the work).

Map-style data (files, hub datasets, a pre-tokenised cache) is tokenised up front and indexed
as ``TokenBlocks``; a step's blocks come from ``StepPlan`` (seeded shuffle per epoch), so a
resumed run needs only its step. Streaming data (``data.streaming=true``) is read in order by a
``BlockStream``; its position goes into the checkpoint's train state and is restored on resume.
Every rank reads the same blocks and takes its share of the step's micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.training.sft_data import dataset_options
from automodel_cli.errors import UserError

#: ``data.name`` -> the dataset pre-training reads: ``auto`` means text from data.path, and the
#: demo preset's ``demo`` (the fine-tuning demo) means the bundled pre-training demo corpus.
TEXT_DATASETS = {"auto": "text", "demo": "demo-text"}

#: Validation blocks read from streaming data when train.eval_batches is not set.
STREAMING_EVAL_BATCHES = 8


@dataclass
class TextData:
    block_size: int
    global_batch_size: int
    blocks: Any = None  # TokenBlocks (map-style)
    plan: Any = None  # StepPlan over the blocks (map-style)
    stream: Any = None  # BlockStream (streaming)
    eval: list[dict[str, Any]] = field(default_factory=list)
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def total_steps(self, max_steps: int | None, epochs: int) -> int:
        from automodel_cli.components.training import steps as step_math

        if self.plan is not None:
            return step_math.total_steps(self.plan, max_steps, epochs)
        if max_steps is None:
            raise UserError("Streaming data has no known length, so the run needs train.max_steps.",
                            "Set train.max_steps=N (each step reads train.global_batch_size blocks).")
        return max_steps

    def step_blocks(self, step: int) -> list[dict[str, Any]]:
        """The blocks of 0-based optimizer ``step`` (streaming: the next ones, in order)."""
        if self.plan is not None:
            return [self.blocks[i] for i in self.plan.samples(step)]
        return self.stream.take(self.global_batch_size)

    def epoch_of(self, step: int) -> int:
        """Pass over the data that 0-based ``step`` is in."""
        return self.plan.epoch_of(step) if self.plan is not None else self.stream.position.epoch

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records about the data after ``step`` steps."""
        if self.stream is not None:
            return {"stream": self.stream.position.as_dict()}
        return {"blocks_consumed": step * self.global_batch_size}

    def restore(self, state: dict[str, Any], step: int) -> None:
        """Continue after ``step`` steps: streaming data seeks the saved position."""
        from automodel_cli.components.data.text import StreamPosition

        if self.stream is None or step == 0:
            return
        saved = (state.get("data") or {}).get("stream")
        if not saved:
            raise UserError(
                "The checkpoint has no streaming data position (it was saved by a run that did not "
                "stream), so this run cannot continue at the right block.",
                "Resume with the original data.streaming setting, or start a new run.",
            )
        position = StreamPosition(**saved)
        if position.blocks != step * self.global_batch_size:
            raise UserError(
                f"The checkpoint of step {step} records {position.blocks} blocks read, not "
                f"{step * self.global_batch_size} (train.global_batch_size changed?).",
                "Resume with the original settings, or start a new run.",
            )
        self.stream.seek(position)

    def eval_batches(self, batch_size: int, max_batches: int | None) -> Iterator[dict[str, Any]]:
        chunks = [self.eval[i:i + batch_size] for i in range(0, len(self.eval), batch_size)]
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.collate(chunk)

    @staticmethod
    def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
        """A block batch's model inputs: token ids and the position ids that mark documents."""
        return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}

    def validate(self, model: Any, precision: Any, batch_size: int, max_batches: int | None) -> dict[str, float] | None:
        """Mean token loss, perplexity and next-token accuracy on the validation blocks (None
        without any). Collective on several ranks: every rank evaluates the same blocks."""
        from automodel_cli.components.training.evaluation import evaluate

        if not self.eval:
            return None

        def logits(model_: Any, batch: dict[str, Any]) -> Any:
            with precision.autocast():
                return model_(**self.model_inputs(batch, precision.device), use_cache=False).logits

        result = evaluate(model, self.eval_batches(batch_size, max_batches), logits)
        return {"eval_loss": result["eval_loss"], "eval_perplexity": math.exp(min(result["eval_loss"], 50.0)),
                "eval_token_accuracy": result["eval_token_accuracy"]}


def check_block_size(block_size: int, model_config: Any, key: str = "data.max_length") -> None:
    """A block must fit the model's positions."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if block_size < 2:
        raise UserError(f"{key}={block_size} is too short: a block needs at least 2 tokens.",
                        f"Set {key} to the sequence length to train on, e.g. 2048.")
    if limit and block_size > limit:
        raise UserError(
            f"{key}={block_size} is longer than the model's max_position_embeddings={limit}.",
            f"Lower {key} to at most {limit}, or, when training from scratch, raise the limit "
            f"with model.config.max_position_embeddings={block_size}.",
        )


def prepare_text_data(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                      block_size: int, eval_batch_size: int) -> TextData:
    from automodel_cli.components.data.text import BlockStream, TokenBlocks, collate_blocks, is_pretokenized
    from automodel_cli.components.training.steps import StepPlan

    gbs = cfg.train.global_batch_size
    flash = str(cfg.model.attn_implementation or "").startswith("flash")
    data = TextData(block_size, gbs, collate=lambda blocks: collate_blocks(blocks, flatten=flash))
    streaming = cfg.data.streaming and not is_pretokenized(cfg.data.path)
    train = open_text(cfg, registries, tokenizer, cfg.data.path, cfg.data.split, streaming, say, "train")

    if callable(train):  # streaming
        data.stream = BlockStream(train, block_size, source=f"The text data `{cfg.data.path}`")
        say(f"train data: streaming {cfg.data.path or cfg.data.name} in order, blocks of {block_size} tokens")
    else:
        blocks = TokenBlocks(train, block_size)
        _check_blocks(len(blocks), train.n_tokens, block_size, "train", cfg.data.path)
        held_out = _eval_size(cfg, len(blocks))
        if held_out:
            blocks, tail = blocks.split_tail(held_out)
            data.eval = [tail[i] for i in range(len(tail))]
        say(f"train data: {train.n_documents} documents, {train.n_tokens} tokens -> {len(blocks)} "
            f"blocks of {block_size} tokens ({train.n_tokens % block_size} tokens left over)"
            + (f", {held_out} blocks held out for validation" if held_out else ""))
        if len(blocks) < gbs:
            raise UserError(
                f"The text data makes {len(blocks)} training blocks of {block_size} tokens, fewer "
                f"than one step of train.global_batch_size={gbs}.",
                "Lower train.global_batch_size or data.max_length, or add text.",
            )
        data.blocks = blocks
        data.plan = StepPlan(len(blocks), gbs, cfg.train.seed, cfg.data.shuffle)

    evaluation = _eval_source(cfg, registries, tokenizer, streaming, say)
    if evaluation is not None:
        cap = cfg.train.eval_batches or (STREAMING_EVAL_BATCHES if callable(evaluation) else None)
        limit = cap * eval_batch_size if cap else None
        if callable(evaluation):
            data.eval = BlockStream(evaluation, block_size, source="The validation text").take_one_pass(limit)
        else:
            eval_blocks = TokenBlocks(evaluation, block_size)
            _check_blocks(len(eval_blocks), evaluation.n_tokens, block_size, "validation", cfg.data.eval_path)
            data.eval = [eval_blocks[i] for i in range(min(len(eval_blocks), limit or len(eval_blocks)))]
        say(f"validation data: {len(data.eval)} blocks of {block_size} tokens")
    return data


def open_text(cfg: Any, registries: Any, tokenizer: Any, path: str | None, split: str,
              streaming: bool, say: Callable[[str], None], what: str) -> Any:
    """``TokenArrays`` of map-style data, or a document opener (``open(start)``) when streaming."""
    import datasets

    from automodel_cli.components.data.text import (document_reader, is_pretokenized, load_pretokenized,
                                                    require_text_column, tokenize_corpus)

    if is_pretokenized(path):
        arrays, meta = load_pretokenized(path, tokenizer)
        say(f"{what} data: pre-tokenised `{path}` ({meta['documents']} documents, {meta['tokens']} tokens "
            f"of {(meta.get('source') or {}).get('path')})")
        return arrays
    name = TEXT_DATASETS.get(cfg.data.name, cfg.data.name)
    options = {**dataset_options(cfg, registries, name), **({"streaming": True} if streaming else {})}
    table = registries.datasets.get(name).load()(path, split, options)
    source = path or name
    require_text_column(table, cfg.data.text_column, source)
    if isinstance(table, datasets.IterableDataset):
        return document_reader(table, tokenizer, cfg.data.text_column)
    return tokenize_corpus(table, tokenizer, cfg.data.text_column, cfg.data.num_proc)


def _check_blocks(count: int, tokens: int, block_size: int, what: str, source: str | None) -> None:
    if count == 0:
        raise UserError(
            f"The {what} text `{source}` has {tokens} tokens, fewer than one block of "
            f"data.max_length={block_size}." if tokens else f"The {what} text `{source}` is empty: "
            "every document in it is blank.",
            "Add text, or lower data.max_length." if tokens else "Point the data path at files with text.",
        )


def _eval_size(cfg: Any, available: int) -> int:
    size = cfg.data.eval_size
    if not size or cfg.data.eval_path or cfg.data.eval_split:
        return 0
    if isinstance(size, float):
        if not 0 < size < 1:
            raise UserError(f"data.eval_size={size} must be a fraction between 0 and 1 or a block count.")
        return max(1, math.floor(size * available))
    if size >= available:
        raise UserError(f"data.eval_size={size} blocks leaves none of the {available} blocks for training.",
                        "Lower data.eval_size.")
    return int(size)


def _eval_source(cfg: Any, registries: Any, tokenizer: Any, streaming: bool, say: Callable[[str], None]) -> Any:
    if cfg.data.eval_path:
        return open_text(cfg, registries, tokenizer, cfg.data.eval_path, cfg.data.eval_split or "train",
                         streaming, say, "validation")
    if cfg.data.eval_split:
        return open_text(cfg, registries, tokenizer, cfg.data.path, cfg.data.eval_split, streaming, say,
                         "validation")
    if cfg.data.eval_size and streaming:
        raise UserError("data.eval_size holds out blocks of map-style data only; streaming data "
                        "cannot set them aside.",
                        "Give validation text with data.eval_path (or data.eval_split), or set "
                        "data.streaming=false.")
    return None
