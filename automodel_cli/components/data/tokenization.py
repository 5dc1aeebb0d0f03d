"""Tokenise SFT data into ``input_ids`` and ``labels`` with the non-trained tokens masked.

Two input shapes, decided by the columns present:

- chat: a ``messages`` column, rendered with the chat template; only assistant tokens are
  trained (chat.py explains how the spans are found);
- prompt/completion: ``[BOS] + prompt + completion + EOS``; the prompt (and BOS) is masked, the
  completion and EOS are trained, so the model learns to stop.

and, where the caller accepts it (``text_column``: ``automodel evaluate``), plain text:
``[BOS] + text + EOS`` with every token after BOS counted.

Labels are *unshifted* (HF causal LMs shift inside the loss: the logit at position ``i``
predicts ``labels[i + 1]``), so ``labels[0]`` can never be predicted and is always set to
``IGNORE_INDEX``; this keeps ``n_trainable_tokens`` equal to the number of tokens the loss
actually counts. Samples are right-truncated to ``max_length``; samples left with no trained
token are dropped (they would only add compute, and a micro-batch made of them would divide
the loss by zero).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

from automodel_cli.errors import UserError

IGNORE_INDEX = -100

#: Warn when more than this fraction of the samples had to be truncated.
TRUNCATION_WARN_FRACTION = 0.10

_STAT_COLUMNS = ("_n_tokens", "_n_trainable", "_length")


class TruncationWarning(UserWarning):
    """Many samples are longer than ``data.max_length``; the caller shows this to the user."""


@dataclass
class SFTStats:
    """What tokenisation did. ``n_samples`` counts input rows; ``n_dropped`` of them had no
    trainable token left and are not in the output (``len(output) == n_samples - n_dropped``)."""

    n_samples: int
    n_truncated: int
    n_trainable_tokens: int
    n_tokens: int
    n_dropped: int = 0
    longest: int = 0  # longest sample in tokens, before truncation

    @property
    def truncated_fraction(self) -> float:
        return self.n_truncated / self.n_samples if self.n_samples else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_sft(
    dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    max_length: int,
    chat_template: str | None = None,
    text_column: str | None = None,
):
    """Tokenise ``dataset`` for SFT; returns ``(dataset[input_ids, labels], SFTStats)``.

    ``text_column``: data with that column and neither chat nor prompt/completion columns is
    read as plain text, every token a label (language-model loss over the whole text).

    Raises ``UserError`` when neither a messages column nor both prompt and completion columns
    exist, when a row is malformed, and when no sample has a trainable token. Warns
    (``TruncationWarning``) when more than 10% of the samples were truncated.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(
            f"data.max_length must be an integer >= 2, got {max_length!r}.",
            "Set data.max_length to the longest sequence (in tokens) to train on, e.g. 2048.",
        )
    columns = list(dataset.column_names)
    if messages_column in columns:
        encode_batch = _chat_batch_encoder(tokenizer, messages_column, chat_template)
        mode = "chat"
    elif prompt_column in columns and completion_column in columns:
        encode_batch = _prompt_completion_batch_encoder(tokenizer, prompt_column, completion_column)
        mode = "prompt/completion"
    elif text_column is not None and text_column in columns:
        encode_batch = _text_batch_encoder(tokenizer, text_column)
        mode = "text"
    else:
        missing = [c for c in (prompt_column, completion_column) if c not in columns]
        raise UserError(
            f"The data has no `{messages_column}` column and lacks the "
            f"{' and '.join(f'`{c}`' for c in missing)} column{'s' if len(missing) > 1 else ''} "
            f"needed for prompt/completion training. Available columns: {columns}.",
            "Name the columns to use with data.prompt_column=... and data.completion_column=... "
            "(or data.messages_column=... for chat data"
            + (", data.text_column=... for plain text" if text_column is not None else "") + ").",
        )

    def process(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], **{c: [] for c in _STAT_COLUMNS}}
        for ids, labels in encode_batch(batch, indices):
            length = len(ids)
            ids, labels = ids[:max_length], labels[:max_length]
            if labels:
                labels[0] = IGNORE_INDEX  # never predicted: nothing precedes it
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_n_tokens"].append(len(ids))
            out["_n_trainable"].append(sum(1 for t in labels if t != IGNORE_INDEX))
            out["_length"].append(length)
        return out

    mapped = dataset.map(
        process,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        num_proc=None,
        desc=f"Tokenising ({mode})",
    )
    stats = _stats(mapped, max_length)
    if stats.n_trainable_tokens == 0:
        raise UserError(*all_masked_message(stats, mode, max_length, prompt_column, completion_column))
    if stats.n_truncated > TRUNCATION_WARN_FRACTION * stats.n_samples:
        warnings.warn(
            TruncationWarning(
                f"{stats.n_truncated} of {stats.n_samples} samples "
                f"({100 * stats.truncated_fraction:.1f}%) are longer than "
                f"data.max_length={max_length} tokens and were truncated (longest: "
                f"{stats.longest}); raise data.max_length to keep them whole."
            ),
            stacklevel=2,
        )
    if stats.n_dropped:
        mapped = mapped.filter(
            lambda n: [x > 0 for x in n], input_columns="_n_trainable", batched=True,
            desc="Dropping samples with no trained tokens",
        )
    return mapped.remove_columns(list(_STAT_COLUMNS)), stats


# ------------------------------------------------------------------------------ encoders


def _prompt_completion_batch_encoder(tokenizer, prompt_column: str, completion_column: str):
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)

    def encode(batch, indices):
        prompts = [_text(v, prompt_column, i) for v, i in zip(batch[prompt_column], indices)]
        completions = [_text(v, completion_column, i) for v, i in zip(batch[completion_column], indices)]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        for p, c in zip(prompt_ids, completion_ids):
            p, c = _starting_with(list(p), bos), _ending_with(list(c), eos)
            yield p + c, [IGNORE_INDEX] * len(p) + c

    return encode


def _text_batch_encoder(tokenizer, text_column: str):
    """Plain text: ``[BOS] + text + EOS``, every token a label."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)

    def encode(batch, indices):
        texts = [_text(v, text_column, i) for v, i in zip(batch[text_column], indices)]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = _ending_with(_starting_with(list(ids), bos), eos)
            yield ids, list(ids)

    return encode


def _starting_with(ids: list[int], token: int | None) -> list[int]:
    return [token] + ids if token is not None and (not ids or ids[0] != token) else ids


def _ending_with(ids: list[int], token: int | None) -> list[int]:
    return ids + [token] if token is not None and (not ids or ids[-1] != token) else ids


def _chat_batch_encoder(tokenizer, messages_column: str, chat_template: str | None):
    from automodel_cli.components.data.chat import ChatEncoder, resolve_template

    encoder = ChatEncoder(tokenizer, resolve_template(tokenizer, chat_template), IGNORE_INDEX)

    def encode(batch, indices):
        for messages, index in zip(batch[messages_column], indices):
            yield encoder.encode(messages, index)

    return encode


def _text(value: Any, column: str, row: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(
        f"Row {row}: column `{column}` holds {'null' if value is None else type(value).__name__}, "
        "not text.",
        f"Fix that row, or point data.{'prompt' if 'prompt' in column else 'completion'}_column "
        "at a text column (chat data belongs in data.messages_column).",
    )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (where a prompt's tokens end inside a longer
    rendering that starts with it, even when tokens merge across the boundary)."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


# --------------------------------------------------------------------------------- stats


def _stats(mapped, max_length: int) -> SFTStats:
    import pyarrow.compute as pc

    table = mapped.with_format("arrow")
    n_tokens = table["_n_tokens"]
    n_trainable = table["_n_trainable"]
    lengths = table["_length"]
    n = len(mapped)
    return SFTStats(
        n_samples=n,
        n_truncated=int(pc.sum(pc.greater(lengths, max_length)).as_py() or 0),
        n_trainable_tokens=int(pc.sum(n_trainable).as_py() or 0),
        n_tokens=int(pc.sum(n_tokens).as_py() or 0),
        n_dropped=int(pc.sum(pc.equal(n_trainable, 0)).as_py() or 0),
        longest=int(pc.max(lengths).as_py() or 0),
    )


def all_masked_message(stats: SFTStats, mode: str, max_length: int, prompt_col: str, completion_col: str):
    if stats.n_truncated:
        cause = (
            f"{stats.n_truncated} of them are longer than data.max_length={max_length} (longest: "
            f"{stats.longest} tokens), so truncation cut off every trained token"
        )
    elif mode == "chat":
        cause = "no conversation has an assistant message with content"
    else:
        cause = f"every `{completion_col}` is empty"
    return (
        f"No trainable tokens: in all {stats.n_samples} samples every label is masked "
        f"({cause}). Only {'assistant' if mode == 'chat' else 'completion'} tokens are trained "
        "and the rest is masked.",
        f"Raise data.max_length (e.g. data.max_length={max(2 * max_length, stats.longest + 1)}), "
        f"shorten the {'system/user turns' if mode == 'chat' else f'`{prompt_col}` texts'}, or "
        "check that the right columns are configured.",
    )
