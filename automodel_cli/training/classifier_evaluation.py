"""``automodel evaluate`` on a sequence classifier (what ``automodel classify`` writes).

A classifier has no language-model head, so loss, perplexity and generated answers do not
apply; it is scored as ``classify``'s validation scores it (``classify_steps.score_batches``):

- a classifier of labels (``id2label`` in its config): cross-entropy, accuracy and macro F1 over
  rows of text and label (``classify.text_column``, ``classify.label_column``; labels as names
  or ids of the model's label set: a label the model does not know is refused, naming it);
- a reward model (one output): the Bradley-Terry loss, pairwise accuracy and mean margin over
  chosen/rejected pairs (``classify.chosen_column``, ``classify.rejected_column``, optional
  ``classify.prompt_column``; chat messages through the chat template).

The label set and task come from the model, never from the data, so the numbers are the
model's on that data. A classify run's saved ``classify.*`` settings are the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automodel_cli.errors import UserError


def classifier_labels(model_config: Any) -> list[str]:
    """The model's label names in id order (``["reward"]`` for a one-output reward model)."""
    count = int(getattr(model_config, "num_labels", 0) or 0)
    if count <= 1:
        return ["reward"]
    names = getattr(model_config, "id2label", None) or {}
    return [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(count)]


def classifier_metrics(cfg: Any, model: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                       device: Any) -> dict[str, Any]:
    """Score ``model`` (a loaded sequence classifier on ``device``) on the data of ``cfg``: its
    validation split when it has one, else all of ``data.path``; ``evaluate.max_samples`` rows at
    most. Returns ``loss``, ``accuracy``, ``f1`` or ``margin``, ``samples`` and ``task``."""
    from automodel_cli.training.classify_data import (CLASSES, REWARD, ClassifyData, _fixed, detect_task,
                                                      encode_classes, encode_pairs)
    from automodel_cli.training.classify_steps import score_batches, set_pad_token
    from automodel_cli.training.sft_data import evaluation_table

    tokenizer = set_pad_token(tokenizer, cfg, say)
    if model.config.pad_token_id is None:  # the head finds each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    labels = classifier_labels(model.config)
    task = REWARD if labels == ["reward"] else CLASSES
    table, source = evaluation_table(cfg, registries, cfg.evaluate.max_samples)
    options = cfg.classify
    try:
        detect_task(list(table.column_names), _fixed(options, task), source)
    except UserError as error:
        what = "a reward model (chosen/rejected pairs)" if task == REWARD else f"a classifier of {len(labels)} labels"
        raise UserError(f"{cfg.model.path} is {what}, and the data does not fit it: {error.message}",
                        error.hint) from None
    if task == REWARD:
        samples, cut = encode_pairs(table, tokenizer, options, cfg.data.max_length, cfg.model.chat_template, source)
    else:
        try:
            samples, cut = encode_classes(table, tokenizer, options, labels, cfg.data.max_length, source, "evaluation")
        except UserError as error:
            if "does not know" not in error.message:
                raise
            raise UserError(error.message, "A trained classifier's label set is the model's labels (id2label in its "
                            "config.json): fix or remove these rows, or map their labels to the model's.") from None
    say(f"eval data: {len(samples)} {'pairs' if task == REWARD else 'samples'}, {cut} truncated to "
        f"{cfg.data.max_length} tokens")
    data = ClassifyData(task, labels, [], samples, tokenizer.pad_token_id)

    def scores(batch: dict[str, Any]) -> Any:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return out.logits.float()

    result = score_batches(model, data.eval_batches(cfg.evaluate.batch_size, None), scores, data)
    return {**result, "task": task, "labels": labels}
