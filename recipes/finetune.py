"""``automodel finetune``: supervised fine-tuning of a causal LM, full or with LoRA/DoRA.

The recipe supplies what is its own -- the tokenizer and instruction data, the model and the
step -- and ``TrainingRun`` does the rest: processes and mesh, the run directory, precision,
optimizer and schedule, resume, the loop, checkpoints, validation and the Hugging Face outputs.
The same script runs on one process or many (``torchrun`` / ``--nproc-per-node``).

One optimizer step consumes ``train.global_batch_size`` samples whatever the number of
processes. Every rank knows which samples the step holds and how many trained tokens they have;
each data-parallel rank takes an equal share of the step's micro-batches and normalises its loss
by the step's total trained tokens, and gradients are summed over ranks (see
``components/distributed/parallelize.py``), so losses match a single-process run.
"""

from __future__ import annotations

from typing import Any

RECIPE = "finetune"


def run(context: Any) -> int:
    from automodel_cli.components.models.loading import load_config, load_tokenizer
    from automodel_cli.components.models.vlm import is_vision_language
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import format_eval
    from automodel_cli.components.training.padding import Padding, run_padding
    from automodel_cli.training.run import TrainingRun
    from automodel_cli.training.sft_data import (check_eval_generate, prepare_sft_data, prepare_vlm_data, sft_step,
                                                sft_validation)

    # 1. Processes, mesh, run directory, loss, precision (TrainingRun checks before anything loads).
    with TrainingRun(context) as run:
        cfg = run.cfg
        run.accumulation()  # global batch sizes that do not divide fail now

        # 2. Tokenizer and data (bad data fails before the model is loaded). A vision-language
        #    model gets its processor (tokenizer + image processor) and image-text data instead.
        vision = is_vision_language(load_config(cfg.model))
        check_eval_generate(cfg, run.shape, vision)  # train.eval_generate: decoding must be able to run here
        tokenizer = load_tokenizer(cfg.model, processor=vision)
        data = (prepare_vlm_data if vision else prepare_sft_data)(
            cfg, tokenizer, run.registries, run.say, pad_to_multiple_of=run.pad_multiple)

        # 3. Model, adapters, parallelism: built empty, then each process's shards are loaded.
        model = run.load_model(tokenizer)
        run.describe_model(model)

        # 4. Steps, optimizer and schedule; padding of the run's micro-batches (known up front).
        plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        padding = run_padding(plan, data.train_lengths, cfg.train.micro_batch_size, range(total_steps), data.collate)
        run_padded = sum(padding, Padding())

        # 5. Resume, then the run's files.
        run.resume()

        # 6. Train: the step of supervised fine-tuning, validating before, during and after (with
        #    train.eval_generate also on generated answers).
        step = sft_step(run, model, data, plan, lambda index: {"padding_fraction": padding[index].fraction})
        validate = sft_validation(run, model, data, tokenizer)
        before = run.validate_before(validate, format_eval)
        run.announce(total_steps, "packs" if cfg.data.packing else "samples")
        run.say(f"padding: {run_padded.fraction:.1%} of the {run_padded.slots} token positions in the run's "
                f"micro-batches ({run_padded.padded} padded, {run_padded.tokens} real)")
        result = run.train(step, total_steps=total_steps, evaluate=validate, describe=format_eval, tokenizer=tokenizer)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 7. Hugging Face outputs (gathered from every rank, written by rank 0).
        return run.finish(tokenizer, summary={"steps": result.step, "before": before, "after": result.after,
                                   "padding_fraction": run_padded.fraction, "padding": run_padded.as_dict()})
