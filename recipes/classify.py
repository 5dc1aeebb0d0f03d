"""``automodel classify``: sequence classification and reward models on a causal-LM backbone.

The model is ``AutoModelForSequenceClassification`` of the backbone's architecture (Llama,
Qwen2, Mistral, Gemma, ...): the decoder, then a linear ``score`` head on the hidden state of the
last token that is not padding. Loaded from a causal LM's weights, the head is new (random,
seeded per parameter); loaded from a classifier (a previous run's ``final/``), it is read. The
labels, the pad token and the head's class are set on the model's config
(``heads.head_config_overrides``, derived from the data and the tokenizer on every start), so
``final/config.json`` carries them.

Two tasks (``training/classify_data.py``): ``classes`` (text + label, cross-entropy; accuracy
and macro F1) and ``reward`` (chosen/rejected pairs, one score per sequence, Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)``; pairwise accuracy and mean margin).

One optimizer step consumes ``train.global_batch_size`` samples (pairs) whatever the number of
processes; each data-parallel rank takes an equal share of the step's micro-batches and
normalises its loss by the step's sample count, so the all-reduced loss is the step's mean and
matches a single process. ``TrainingRun`` does the rest, as for finetune.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.config.schema import option

RECIPE = "classify"
#: The recipe's own config section, ``classify`` (read by this recipe only).
CONFIG = {"classify": {
    "task": option(str, "auto", "classes (text + label), reward (chosen/rejected pairs: a Bradley-Terry reward model) or auto (from the columns).",
                   choices=("auto", "classes", "reward")),
    "text_column": option(str, "text", "Column holding the text to classify."),
    "label_column": option(str, "label", "Column holding each text's label: a name (string) or an integer id."),
    "labels": option((list, type(None)), None, "The label names in id order (null: the training split's labels, sorted); an integer label is then a position in this list."),
    "chosen_column": option(str, "chosen", "Reward data: the preferred answer (a string, or a list of chat messages)."),
    "rejected_column": option(str, "rejected", "Reward data: the answer not preferred (same form as chosen)."),
    "prompt_column": option(str, "prompt", "Reward data: optional prompt put before both answers (a string, or chat messages); ignored when the data has no such column."),
    "pad_token": option((str, type(None)), None, "Pad token when the tokenizer has none: eos (the EOS token; trailing EOS tokens then count as padding) or a token of the vocabulary. null: the tokenizer's own."),
}}


def run(context: Any) -> int:
    from automodel_cli.components.models.heads import head_config_overrides
    from automodel_cli.components.models.loading import load_config, load_tokenizer
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.classification import format_classify_eval
    from automodel_cli.training.classify_data import REWARD, prepare_classify_data
    from automodel_cli.training.classify_steps import classify_step, classify_validation, check_layout, set_pad_token
    from automodel_cli.training.run import TrainingRun

    cfg = context.config
    check_layout(cfg)  # parallelism the pooled head does not support: refused before anything

    # 1. Processes, mesh, run directory, loss, precision.
    with TrainingRun(context) as run:
        run.accumulation()  # global batch sizes that do not divide fail now

        # 2. Tokenizer with a pad token, then data (bad data fails before the model loads).
        tokenizer = set_pad_token(load_tokenizer(cfg.model, eos_as_pad=False), cfg, run.say)
        data = prepare_classify_data(cfg, tokenizer, run.registries, run.say)

        # 3. The backbone with a sequence-classification head: labels and pad token in its config.
        backbone = load_config(cfg.model)
        if getattr(backbone, "pad_token_id", None) not in (None, tokenizer.pad_token_id):
            run.say(f"note: the model's config.pad_token_id {backbone.pad_token_id} becomes the tokenizer's pad token "
                    f"id {tokenizer.pad_token_id}: the head finds each sequence's last real token by it")
        head = head_config_overrides(backbone, cfg.model.path, labels=data.labels,
                                     pad_token_id=tokenizer.pad_token_id,
                                     problem_type="single_label_classification" if data.task != REWARD else None)
        model = run.load_model(tokenizer, config_overrides=head)
        run.describe_model(model, extra=f"{'reward model' if data.task == REWARD else f'{len(data.labels)} labels'}, ")

        # 4. Steps, optimizer and schedule; resume; the run's files.
        plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        run.resume()

        # 5. Train, validating before, during and after.
        validate = classify_validation(run, model, data)
        before = run.validate_before(validate, format_classify_eval)
        run.announce(total_steps, "pairs" if data.task == REWARD else "samples")
        result = run.train(classify_step(run, model, data, plan), total_steps=total_steps, evaluate=validate,
                           describe=format_classify_eval, tokenizer=tokenizer)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 6. Hugging Face outputs: final/ loads with AutoModelForSequenceClassification.
        return run.finish(tokenizer, summary={"steps": result.step, "task": data.task, "labels": data.labels,
                                              "before": before, "after": result.after})
