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
    import torch

    from automodel_cli.components.loss.head import training_loss
    from automodel_cli.components.models.loading import load_model, load_tokenizer
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import evaluate, format_eval
    from automodel_cli.components.training.padding import Padding, run_padding
    from automodel_cli.training.model_setup import adapter_base
    from automodel_cli.training.run import StepOutput, TrainingRun
    from automodel_cli.training.sft_data import prepare_sft_data

    # 1. Processes, mesh, run directory, loss, precision (TrainingRun checks before anything loads).
    with TrainingRun(context) as run:
        cfg = run.cfg
        accumulation = run.accumulation()  # global batch sizes that do not divide fail now

        # 2. Tokenizer and data (bad data fails before the model is loaded).
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_sft_data(cfg, tokenizer, run.registries, run.say,
                                pad_to_multiple_of=run.shape.tp if run.sequence_parallel else None)

        # 3. Model, adapters, parallelism.
        model = load_model(cfg.model, seed=cfg.train.seed, dtype=run.precision.param_dtype)
        base_path = adapter_base(model, tokenizer, cfg, run.output_dir, run.env.is_main)
        model = run.prepare_model(model)
        run.describe_model(model)

        # 4. Steps, optimizer and schedule; padding of the run's micro-batches (known up front).
        plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        padding = run_padding(plan, data.train_lengths, cfg.train.micro_batch_size, range(total_steps), data.collate)
        run_padded = sum(padding, Padding())

        # 5. Resume, then the run's files.
        run.resume()

        def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
            return {k: batch[k].to(run.precision.device)
                    for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

        def forward(model_: Any, batch: dict[str, Any]) -> Any:  # full logits (validation)
            with run.precision.autocast():
                return model_(**model_inputs(batch), use_cache=False).logits

        def validate() -> dict[str, float] | None:  # every rank: sharded forward passes are collective
            if not data.eval:
                return None
            return evaluate(model, data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches), forward)

        def step(index: int) -> StepOutput:
            """One optimizer step's forward and backward passes on this rank's micro-batches."""
            samples = plan.samples(index)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            label_tokens = sum(data.train_label_tokens[i] for i in samples)
            loss_sum = torch.zeros((), device=run.precision.device)
            for group in groups[run.dp_index::run.dp_size]:
                batch = data.collate([data.train[i] for i in group])
                loss = training_loss(model, model_inputs(batch), batch["labels"], label_tokens, run.loss_spec,
                                     run.precision.autocast)
                loss.backward()
                loss_sum += loss.detach()
            return StepOutput({"loss": loss_sum}, tokens=sum(data.train_lengths[i] for i in samples),
                              metrics={"label_tokens": label_tokens, "padding_fraction": padding[index].fraction,
                                       "epoch": plan.epoch_of(index)})

        # 6. Train, validating before, during and after.
        before = validate() if run.start_step == 0 else None
        if before:
            run.say(f"before training: {format_eval(before)}")
        run.say(f"training {total_steps - run.start_step} steps of {cfg.train.global_batch_size} "
                f"{'packs' if cfg.data.packing else 'samples'} ({accumulation} micro-batches of "
                f"{cfg.train.micro_batch_size} on each of {run.dp_size} data-parallel rank(s)) -> {run.output_dir}")
        run.say(f"padding: {run_padded.fraction:.1%} of the {run_padded.slots} token positions in the run's "
                f"micro-batches ({run_padded.padded} padded, {run_padded.tokens} real)")
        result = run.train(step, total_steps=total_steps, evaluate=validate, describe=format_eval, tokenizer=tokenizer)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 7. Hugging Face outputs (gathered from every rank, written by rank 0).
        return run.finish(tokenizer, base_path=base_path,
                          summary={"steps": result.step, "before": before, "after": result.after,
                                   "padding_fraction": run_padded.fraction, "padding": run_padded.as_dict()})
