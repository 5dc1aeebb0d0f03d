"""Preference data for ``automodel dpo``: load, check, tokenise pairs, batch them.

A row is one pair: a prompt, a chosen and a rejected response, in one of three layouts:

- strings: ``prompt``, ``chosen``, ``rejected`` (``[BOS] + prompt`` then response ``+ EOS``,
  as SFT's prompt/completion data);
- chat, implicit prompt: ``chosen`` and ``rejected`` are whole conversations (lists of
  ``{role, content}``) sharing their first messages, which are the prompt;
- chat, explicit prompt: ``prompt`` is a list of messages and ``chosen``/``rejected`` the
  assistant turn(s) (a list of messages, one message, or a string). When ``chosen`` and
  ``rejected`` are whole conversations anyway (UltraFeedback's layout: a ``prompt`` string next
  to conversations that start with that user turn), the prompt is taken from them, as above.

Chat rows are rendered with the chat template (``components/data/chat.py``) and only the
response's assistant tokens are scored: the prompt's tokens are those of the prompt rendered with
the generation prompt, as TRL's DPOTrainer counts them. Bad rows fail with the row named:
missing columns, a chosen response equal to the rejected one (dropped with a warning only with
``dpo.drop_identical_pairs``), an empty response. Pairs whose prompt fills ``data.max_length``
(no response token left after truncation) are dropped with a warning.

``PairCollator`` batches ``k`` pairs as one concatenated batch: rows ``0..k-1`` are the chosen
sequences, ``k..2k-1`` the rejected ones (one forward for both); with packing, the ``2k``
sequences are packed into rows of ``data.max_length`` (``components/data/packing.py``: position
ids restart per sequence, so each attends only to itself) and ``sequence_index`` says which
sequence every token belongs to, so log-probabilities are summed per sequence.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.components.data.chat import opens_conversation, row_label
from automodel_cli.components.loss.preference import REFERENCE_FREE
from automodel_cli.errors import UserError
from automodel_cli.training.sft_data import SFTData

IGNORE_INDEX = -100
SIDES = ("chosen", "rejected")
#: Columns of precomputed reference log-probabilities (TRL's names: what its DPOTrainer adds with
#: ``precompute_ref_log_probs``): the summed log-probability of each response under the reference.
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceData(SFTData):
    """``SFTData`` of pairs: each sample is ``{"chosen": (ids, labels), "rejected": (ids, labels)}``
    plus, once computed, ``"reference": (chosen_logp, rejected_logp)``; ``train_lengths`` count
    both sequences' tokens."""

    #: Scored chosen tokens of a pair (orpo's NLL is normalised by the step's total).
    train_chosen_tokens: list[int] = field(default_factory=list)
    #: Every pair carries its reference log-probabilities from the data (``REFERENCE_COLUMNS``).
    reference_from_data: bool = False

    @staticmethod
    def sample_length(sample: dict[str, Any]) -> int:
        return pair_length(sample)


def pair_length(pair: dict[str, Any]) -> int:
    return len(pair["chosen"][0]) + len(pair["rejected"][0])


def scored_tokens(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])


# ------------------------------------------------------------------------------ loading
def prepare_preference_data(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                            pad_to_multiple_of: int | None = None) -> PreferenceData:
    """Training and validation pairs from ``data.*`` (any registered dataset, ``data.path``
    files or hub ids), tokenised and checked; batched as ``data.packing`` says."""
    from automodel_cli.training.sft_data import load_tables

    train_table, eval_table = load_tables(cfg, registries)
    train = encode_pairs(train_table, tokenizer, cfg, say, "train")
    evaluation = encode_pairs(eval_table, tokenizer, cfg, say, "eval") if eval_table is not None else []
    from_data = [all("reference" in pair for pair in pairs) for pairs in (train, evaluation) if pairs]
    if any(from_data) and not all(from_data):
        raise UserError(
            f"The training data has the reference log-probability columns {list(REFERENCE_COLUMNS)} but the "
            "validation data has not: a run takes the reference from the data or from a model, not from both.",
            "Add the columns to the validation data too, or drop them from the training data (the reference "
            "model then computes them).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flatten = bool(cfg.data.packing) and str(cfg.model.attn_implementation or "").startswith("flash")
    return PreferenceData(
        train=train, eval=evaluation,
        collate=PairCollator(pad_id, packed_length=cfg.data.max_length if cfg.data.packing else None,
                             pad_to_multiple_of=pad_to_multiple_of, flatten=flatten),
        eval_collate=PairCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of),
        train_lengths=[pair_length(p) for p in train],
        train_chosen_tokens=[scored_tokens(p["chosen"][1]) for p in train],
        reference_from_data=all(from_data),
    )


def encode_pairs(table: Any, tokenizer: Any, cfg: Any, say: Callable[[str], None], what: str) -> list[dict[str, Any]]:
    """Check and tokenise every row of ``table`` (see the module docstring); says what it did."""
    columns = list(table.column_names)
    prompt_column = cfg.data.prompt_column
    chosen_column, rejected_column = cfg.dpo.chosen_column, cfg.dpo.rejected_column
    for column, key in ((chosen_column, "dpo.chosen_column"), (rejected_column, "dpo.rejected_column")):
        if column not in columns:
            closest = difflib.get_close_matches(column, columns, n=1, cutoff=0.4)
            raise UserError(
                f"The {what} preference data has no `{column}` column (columns found: {columns}"
                + (f"; the closest is `{closest[0]}`" if closest else "") + ").",
                f"Preference data needs a chosen and a rejected response per row: name the columns with "
                f"{key}=... (and data.prompt_column=... for the prompt), or rename them in the data.",
            )
    present = [column for column in REFERENCE_COLUMNS if column in columns]
    if len(present) == 1:
        raise UserError(f"The {what} preference data has the `{present[0]}` column but not "
                        f"`{next(c for c in REFERENCE_COLUMNS if c not in present)}`.",
                        "Give both reference log-probability columns, or neither (the reference model then "
                        "computes them).")
    reference_free = cfg.dpo.loss in REFERENCE_FREE
    with_reference = len(present) == 2 and not reference_free and not cfg.dpo.reference_path
    if len(present) == 2 and not with_reference:
        why = (f"dpo.loss={cfg.dpo.loss} is reference-free" if reference_free
               else f"dpo.reference_path={cfg.dpo.reference_path} computes them")
        say(f"note ({what} data): the columns {list(REFERENCE_COLUMNS)} are not used: {why}")
    encoder = PairEncoder(tokenizer, cfg.model.chat_template)
    pairs: list[dict[str, Any]] = []
    identical: list[int] = []
    truncated = 0
    has_prompt = prompt_column in columns
    for index, row in enumerate(table):
        prompt = row[prompt_column] if has_prompt else None
        chosen, rejected = row[chosen_column], row[rejected_column]
        if chosen == rejected:
            identical.append(index)
            continue
        pair = encoder.encode(prompt, chosen, rejected, index, (prompt_column, chosen_column, rejected_column))
        trimmed = {side: _truncate(*pair[side], cfg.data.max_length) for side in SIDES}
        if any(scored_tokens(labels) == 0 for _, labels in trimmed.values()):
            truncated += 1
            continue
        if with_reference:
            trimmed["reference"] = tuple(_log_probability(row[column], column, index) for column in REFERENCE_COLUMNS)
        pairs.append(trimmed)
    if identical and not cfg.dpo.drop_identical_pairs:
        shown = ", ".join(map(str, identical[:10])) + (f" and {len(identical) - 10} more" if len(identical) > 10 else "")
        raise UserError(
            f"The {what} preference data has {len(identical)} pair(s) whose chosen response equals the "
            f"rejected one (row{'s' if len(identical) > 1 else ''} {shown}, counting from 0): they teach "
            "no preference.",
            "Fix or remove those rows, or set dpo.drop_identical_pairs=true to drop them with a warning.",
        )
    if identical:
        say(f"warning ({what} data): dropped {len(identical)} pair(s) whose chosen equals the rejected response "
            f"(dpo.drop_identical_pairs=true)")
    if truncated:
        say(f"warning ({what} data): dropped {truncated} pair(s) whose prompt fills data.max_length="
            f"{cfg.data.max_length} (no response token left); raise data.max_length to keep them")
    if not pairs:
        raise UserError(f"The {what} preference data has no usable pair ({len(table)} rows).",
                        "Check the data and data.max_length.")
    tokens = sum(pair_length(p) for p in pairs)
    say(f"{what} data: {len(pairs)} pairs, {tokens} tokens (chosen + rejected), "
        f"{sum(scored_tokens(p[s][1]) for p in pairs for s in SIDES)} scored response tokens")
    return pairs


def _log_probability(value: Any, column: str, row: int) -> float:
    """A precomputed reference log-probability: a finite number <= 0."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
        raise UserError(f"Preference data {row_label(row)}: `{column}` is {value!r}, not a log-probability "
                        "(a finite number <= 0, the sum over the response's tokens).",
                        "Fix that row, or drop the reference columns so that the reference model computes them.")
    return float(value)


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return ids[:max_length], labels[:max_length]


class PairEncoder:
    """One row -> ``{"chosen": (ids, labels), "rejected": (ids, labels)}`` with only response
    tokens labelled (layouts in the module docstring)."""

    def __init__(self, tokenizer: Any, chat_template: str | None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._chat: Any = None  # ChatEncoder, built for the first chat row

    def encode(self, prompt: Any, chosen: Any, rejected: Any, row: int, columns: tuple[str, str, str]) -> dict[str, Any]:
        for value, column in zip((chosen, rejected), columns[1:]):
            if _is_empty(value):
                raise UserError(
                    f"Preference data {row_label(row)}: the `{column}` response is empty.",
                    "Every pair needs a non-empty chosen and rejected response: fix or remove that row.")
        if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
            return self._encode_text(prompt, chosen, rejected, row, columns[0])
        return self._encode_chat(prompt, chosen, rejected, row)

    # -- strings ----------------------------------------------------------------------------
    def _encode_text(self, prompt: Any, chosen: str, rejected: str, row: int, prompt_column: str) -> dict[str, Any]:
        from automodel_cli.components.data.tokenization import _text

        tok = self.tokenizer
        prompt_ids = tok(_text(prompt, prompt_column, row) if prompt is not None else "",
                         add_special_tokens=False)["input_ids"]
        bos, eos = tok.bos_token_id, tok.eos_token_id
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos] + list(prompt_ids)
        out = {}
        for side, text in zip(SIDES, (chosen, rejected)):
            response = list(tok(text, add_special_tokens=False)["input_ids"])
            if eos is not None and (not response or response[-1] != eos):
                response.append(eos)
            out[side] = (list(prompt_ids) + response, [IGNORE_INDEX] * len(prompt_ids) + response)
        return out

    # -- chat -------------------------------------------------------------------------------
    def _encode_chat(self, prompt: Any, chosen: Any, rejected: Any, row: int) -> dict[str, Any]:
        from automodel_cli.components.data.chat import ChatEncoder, normalize_messages, resolve_template
        from automodel_cli.components.data.tokenization import common_prefix_length

        if self._chat is None:
            self._chat = ChatEncoder(self.tokenizer, resolve_template(self.tokenizer, self.chat_template), IGNORE_INDEX)
        responses = [_as_messages(value) for value in (chosen, rejected)]
        if prompt is None or all(opens_conversation(r) for r in responses):
            # implicit prompt: the messages both conversations start with. Also when a prompt column
            # exists but the conversations repeat it (UltraFeedback's layout: a prompt string and
            # chosen/rejected that start with the user turn): the user turn is not said twice.
            shared = 0
            while (shared < min(map(len, responses)) - 1 and responses[0][shared] == responses[1][shared]):
                shared += 1
            prompt_messages = responses[0][:shared]
            responses = [r[shared:] for r in responses]
        else:
            prompt_messages = _as_messages(prompt, role="user")
        prompt_messages = normalize_messages(prompt_messages, row) if prompt_messages else []
        prompt_ids = (self.tokenizer(self._chat.render(prompt_messages, row, add_generation_prompt=True),
                                     add_special_tokens=False)["input_ids"] if prompt_messages else [])
        encoded = [self._chat.encode(prompt_messages + response, row) for response in responses]
        prompt_length = min(common_prefix_length(prompt_ids, ids) for ids, _ in encoded)
        out = {}
        for side, (ids, labels) in zip(SIDES, encoded):
            labels = [IGNORE_INDEX] * prompt_length + list(labels[prompt_length:])
            if scored_tokens(labels) == 0:
                raise UserError(
                    f"Preference data {row_label(row)}: the {side} response has no assistant tokens to score "
                    "(its messages after the prompt hold no assistant turn with content).",
                    f"Give `{side}` as the assistant's answer (a string, or messages ending with an assistant turn).")
            out[side] = (list(ids), labels)
        return out


def _as_messages(value: Any, role: str = "assistant") -> list[dict[str, Any]]:
    """A string is one message of ``role``; one message dict a list of one."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    return list(value) if isinstance(value, list) else value


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return _is_empty(value.get("content"))
    if isinstance(value, list):
        return not value or (isinstance(value[-1], dict) and _is_empty(value[-1].get("content")))
    return False


# ------------------------------------------------------------------------------ batching
class PairCollator:
    """``collator(pairs) -> batch``: the concatenated batch of ``k`` pairs (module docstring).

    Keys: ``input_ids``, ``labels``, ``attention_mask`` (or ``position_ids`` when packed),
    ``sequence_index`` (``[rows, T]``, the sequence of each token, -1 for padding), ``pairs``
    (``k``) and, when every pair has it, ``reference`` (``[2k]`` precomputed reference
    log-probabilities, chosen first)."""

    def __init__(self, pad_token_id: int, *, packed_length: int | None = None,
                 pad_to_multiple_of: int | None = None, flatten: bool = False):
        from automodel_cli.components.data import SFTCollator

        self.packed_length = packed_length
        self.sft = SFTCollator(pad_token_id, packed=packed_length is not None, pad_to_multiple_of=pad_to_multiple_of,
                               flatten=flatten)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from automodel_cli.components.data import pack_sequences

        sequences = [pair[side] for side in SIDES for pair in pairs]  # all chosen, then all rejected
        if self.packed_length is None:
            rows = [{"input_ids": ids, "labels": labels} for ids, labels in sequences]
            owners = [[index] * len(ids) for index, (ids, _) in enumerate(sequences)]
        else:
            rows = pack_sequences([ids for ids, _ in sequences], [labels for _, labels in sequences], self.packed_length)
            owners = [[doc for doc, n in zip(pack["documents"], pack["seq_lengths"]) for _ in range(n)] for pack in rows]
        if self.sft.flatten:
            owners = [sum(owners, [])]
        batch = self.sft(rows)
        width = batch["input_ids"].shape[1]
        batch["sequence_index"] = torch.tensor([row + [-1] * (width - len(row)) for row in owners], dtype=torch.long)
        batch["pairs"] = len(pairs)
        if all("reference" in pair for pair in pairs):
            batch["reference"] = torch.tensor([pair["reference"][i] for i in range(2) for pair in pairs],
                                              dtype=torch.float32)
        return batch


#: Batch keys the model takes (the rest go to the loss).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {key: batch[key].to(device) for key in MODEL_INPUTS if key in batch}

