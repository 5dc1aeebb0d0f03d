"""From config to ready-to-collate samples for sequence classification and reward models.

Two layouts (``classify.task``; ``auto`` tells them apart by the columns):

* ``classes``: a text column and a label column (``classify.text_column``,
  ``classify.label_column``). Labels are names (strings) or integer ids; the label set is the
  training split's (sorted) or ``classify.labels`` (its order gives the ids, and an integer label
  is then a position in that list). An evaluation label outside the set is a ``UserError``.
* ``reward``: ``chosen``/``rejected`` pairs (``classify.chosen_column``,
  ``classify.rejected_column``), strings with an optional prompt column prepended, or chat
  ``messages`` lists (the prompt a list of messages or a string, the user's turn) rendered with
  the chat template. A pair whose two sides are the same is a ``UserError``.

Sequences are right-padded with the tokenizer's pad token: the model pools the last token that
is not padding (``config.pad_token_id``), and right padding leaves every real token's position
unchanged, so a padded batch gives each sample the logits of its unpadded forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.errors import UserError

CLASSES, REWARD = "classes", "reward"


@dataclass
class ClassifyData:
    """Encoded samples: ``{"input_ids", "label"}`` (classes) or ``{"chosen_ids", "rejected_ids"}``
    (reward); ``labels`` the label names in id order (``["reward"]`` for a reward model)."""

    task: str
    labels: list[str]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    pad_id: int
    train_lengths: list[int] = field(default_factory=list)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A right-padded batch; a reward batch holds the chosen rows, then the rejected ones."""
        import torch

        if self.task == REWARD:
            rows = [s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples]
        else:
            rows = [s["input_ids"] for s in samples]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, :len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == CLASSES:
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch

    def eval_batches(self, batch_size: int, max_batches: int | None) -> Iterator[dict[str, Any]]:
        """Validation batches of similar-length samples, in a fixed order."""
        order = sorted(range(len(self.eval)), key=lambda i: (sample_length(self.eval[i]), i))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.collate([self.eval[i] for i in chunk])


def sample_length(sample: dict[str, Any]) -> int:
    """Tokens the sample puts through the model (both sides of a pair)."""
    if "input_ids" in sample:
        return len(sample["input_ids"])
    return len(sample["chosen_ids"]) + len(sample["rejected_ids"])


def detect_task(columns: list[str], options: Any, source: str) -> str:
    """``classify.task``, or for ``auto`` the layout the columns hold: chosen/rejected -> reward,
    the text column -> classes; neither is a ``UserError`` listing the columns."""
    task = options.task
    wanted = {REWARD: [options.chosen_column, options.rejected_column],
              CLASSES: [options.text_column, options.label_column]}
    if task == "auto":
        if all(c in columns for c in wanted[REWARD]):
            task = REWARD
        elif options.text_column in columns:
            task = CLASSES
        else:
            raise UserError(
                f"The data `{source}` has neither a text column `{options.text_column}` (classification) nor "
                f"`{options.chosen_column}`/`{options.rejected_column}` columns (reward model); it has {columns}.",
                "Name the columns with classify.text_column and classify.label_column, or classify.chosen_column "
                "and classify.rejected_column (and set classify.task=classes or reward).")
    missing = [c for c in wanted[task] if c not in columns]
    if missing:
        keys = {options.text_column: "text_column", options.label_column: "label_column",
                options.chosen_column: "chosen_column", options.rejected_column: "rejected_column"}
        raise UserError(
            f"The {task} data `{source}` lacks column(s) {missing}; it has {columns}.",
            "Point classify." + ", classify.".join(keys[c] for c in missing) + " at the column(s) that hold them.")
    return task


def label_set(values: list[Any], given: list[Any] | None, column: str, source: str) -> list[str]:
    """The label names in id order: ``given`` (``classify.labels``), else the training split's
    labels sorted (integer ids numerically). A training label outside ``given`` is refused."""
    if given:
        names = [str(name) for name in given]
        if len(set(names)) != len(names):
            raise UserError(f"classify.labels {names} lists a label twice.", "List each label once.")
        return names
    if any(v is None for v in values):
        row = next(i for i, v in enumerate(values) if v is None)
        raise UserError(f"Training data `{source}` row {row} has no label (column `{column}`).",
                        "Give every row a label, or drop the rows without one.")
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        raise UserError(f"Training data `{source}` has a single label ({distinct}) in column `{column}`: "
                        "there is nothing to tell apart.",
                        "Classification needs at least two labels in the training split.")
    return [str(v) for v in distinct]


def label_ids(values: list[Any], labels: list[str], column: str, source: str, split: str) -> list[int]:
    """Each row's label id: a name of ``labels``, or an integer id (with ``classify.labels``, a
    position in it). A label outside the set names the row, the label(s) and the known set."""
    index = {name: i for i, name in enumerate(labels)}
    ids, unknown = [], {}
    for row, value in enumerate(values):
        if str(value) in index and not isinstance(value, bool):
            ids.append(index[str(value)])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels) \
                and not all(name.lstrip("-").isdigit() for name in labels):
            ids.append(value)  # an id into classify.labels
        else:
            unknown.setdefault(str(value), row)
            ids.append(-1)
    if unknown:
        shown = ", ".join(f"`{label}` (row {row})" for label, row in list(unknown.items())[:5])
        raise UserError(
            f"The {split} data `{source}` has label(s) the model does not know (column `{column}`): {shown}; "
            f"the known labels are {labels}.",
            "The label set comes from the training split (or classify.labels): add the label(s) there, "
            "or remove or fix these rows.")
    return ids


def encode_text(tokenizer: Any, text: Any, max_length: int, row: int, column: str, source: str) -> tuple[list[int], bool]:
    """Token ids of one text (truncated to ``max_length``) and whether it was truncated."""
    if not isinstance(text, str) or not text:
        raise UserError(f"Data `{source}` row {row}: column `{column}` must be a non-empty string, got {text!r:.60}.",
                        "Fix or remove that row.")
    ids = tokenizer(text)["input_ids"]
    return ids[:max_length], len(ids) > max_length


def render_pair_side(tokenizer: Any, prompt: Any, side: Any, template: str | None, row: int) -> str:
    """One side of a preference pair as text: ``prompt + side`` for strings; for chat messages
    the prompt's messages (a string prompt is the user's turn) then the side's, through the
    chat template; a side that is a whole conversation already holds its prompt."""
    from automodel_cli.components.data.chat import normalize_messages, opens_conversation

    if isinstance(side, str):
        return (prompt if isinstance(prompt, str) else "") + side
    messages = normalize_messages(side, row)
    if opens_conversation(side):
        pass  # UltraFeedback's layout: the conversation starts with the prompt's user turn
    elif isinstance(prompt, str) and prompt:
        messages = [{"role": "user", "content": prompt}, *messages]
    elif isinstance(prompt, list) and prompt:
        messages = [*normalize_messages(prompt, row), *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)


def encode_pairs(table: Any, tokenizer: Any, options: Any, max_length: int, chat_template: str | None,
                 source: str) -> tuple[list[dict[str, Any]], int]:
    """Reward samples of ``table`` and how many sides were truncated; an identical pair is refused."""
    from automodel_cli.components.data.chat import resolve_template

    prompts = table[options.prompt_column] if options.prompt_column in table.column_names else [None] * len(table)
    chosen, rejected = table[options.chosen_column], table[options.rejected_column]
    template = resolve_template(tokenizer, chat_template) if any(not isinstance(c, str) for c in chosen[:1]) else None
    samples, truncated = [], 0
    for row, (prompt, good, bad) in enumerate(zip(prompts, chosen, rejected)):
        for side, column in ((good, options.chosen_column), (bad, options.rejected_column)):
            if not side:
                raise UserError(f"Preference data `{source}` row {row}: `{column}` is empty.", "Fix or remove that row.")
        texts = [render_pair_side(tokenizer, prompt, side, template, row) for side in (good, bad)]
        if texts[0] == texts[1]:
            raise UserError(
                f"Preference data `{source}` row {row}: `{options.chosen_column}` and `{options.rejected_column}` "
                "are identical, so the pair prefers nothing.",
                "Remove that row, or fix its rejected answer.")
        (good_ids, cut_good), (bad_ids, cut_bad) = (
            encode_text(tokenizer, text, max_length, row, column, source)
            for text, column in zip(texts, (options.chosen_column, options.rejected_column)))
        truncated += cut_good + cut_bad
        samples.append({"chosen_ids": good_ids, "rejected_ids": bad_ids})
    return samples, truncated


def encode_classes(table: Any, tokenizer: Any, options: Any, labels: list[str], max_length: int, source: str,
                   split: str) -> tuple[list[dict[str, Any]], int]:
    """Classification samples of ``table`` and how many texts were truncated."""
    if options.label_column not in table.column_names:
        raise UserError(f"The {split} data `{source}` lacks the label column `{options.label_column}`; it has "
                        f"{table.column_names}.", "Point classify.label_column at the column holding the labels.")
    ids = label_ids(table[options.label_column], labels, options.label_column, source, split)
    samples, truncated = [], 0
    for row, (text, label) in enumerate(zip(table[options.text_column], ids)):
        tokens, cut = encode_text(tokenizer, text, max_length, row, options.text_column, source)
        truncated += cut
        samples.append({"input_ids": tokens, "label": label})
    return samples, truncated


def prepare_classify_data(cfg: Any, tokenizer: Any, registries: Any, say: Any) -> ClassifyData:
    """Load, check and encode the training and validation data as ``classify.*`` says."""
    from automodel_cli.training.sft_data import load_tables

    options = cfg.classify
    train_table, eval_table = load_tables(cfg, registries)
    train_source = cfg.data.path or cfg.data.name
    eval_source = cfg.data.eval_path or train_source
    task = detect_task(train_table.column_names, options, train_source)
    if eval_table is not None:
        detect_task(eval_table.column_names, _fixed(options, task), eval_source)
    max_length = cfg.data.max_length
    if task == REWARD:
        labels = ["reward"]

        def encode(table: Any, source: str, split: str) -> tuple[list[dict[str, Any]], int]:
            return encode_pairs(table, tokenizer, options, max_length, cfg.model.chat_template, source)
    else:
        labels = label_set(train_table[options.label_column], options.labels, options.label_column, train_source)

        def encode(table: Any, source: str, split: str) -> tuple[list[dict[str, Any]], int]:
            return encode_classes(table, tokenizer, options, labels, max_length, source, split)

    train, cut = encode(train_table, train_source, "training")
    say(f"train data: {len(train)} {'pairs' if task == REWARD else 'samples'}, {cut} truncated to {max_length} tokens")
    evaluation: list[dict[str, Any]] = []
    if eval_table is not None:
        evaluation, cut = encode(eval_table, eval_source, "evaluation")
        say(f"eval data: {len(evaluation)} {'pairs' if task == REWARD else 'samples'}, {cut} truncated")
    if task == CLASSES:
        say(f"labels ({len(labels)}): " + ", ".join(f"{i}={name}" for i, name in enumerate(labels)))
    return ClassifyData(task, labels, train, evaluation, tokenizer.pad_token_id,
                        train_lengths=[sample_length(s) for s in train])


def _fixed(options: Any, task: str) -> Any:
    """``options`` with ``task`` decided (the evaluation split must have the training split's layout)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: getattr(options, k) for k in ("text_column", "label_column", "chosen_column",
                                                              "rejected_column")}, task=task)
