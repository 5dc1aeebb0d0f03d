"""``automodel finetune``: supervised fine-tuning of a causal LM, full or with LoRA/DoRA.

The recipe reads top to bottom: pick the output directory, set up the processes and the device
mesh, load the tokenizer and data, load the model, add adapters, parallelize, build the
optimizer, resume if asked, train, evaluate, save a Hugging Face directory. The same script runs
on one process or many (``torchrun`` / ``--nproc-per-node``): parallelism is configuration.

One optimizer step consumes ``train.global_batch_size`` samples whatever the number of
processes. Every rank knows which samples the step holds and how many trained tokens they have;
each data-parallel rank takes an equal share of the step's micro-batches and normalises its loss
by the step's total trained tokens, and gradients are summed over ranks (see
``components/distributed/parallelize.py``), so losses match a single-process run.
"""

from __future__ import annotations

import time
from typing import Any


RECIPE = "finetune"


def run(cfg: Any) -> int:
    import torch

    from automodel_cli.components.checkpoint import GracefulStop, save_checkpoint
    from automodel_cli.components.distributed import mesh as meshes
    from automodel_cli.components.loss.head import training_loss
    from automodel_cli.components.models.loading import load_model, load_tokenizer
    from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr
    from automodel_cli.components.peft.lora import count_parameters
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import evaluate, format_eval
    from automodel_cli.components.training.loop import (build_loss, checkpoint_due, claim_output_dir, close_loop,
                                                        data_parallel, log_step, open_loggers, optimizer_step,
                                                        processes, resume, save_outputs, seeded_precision,
                                                        step_rates)
    from automodel_cli.components.training.model_setup import adapter_base, prepare_model
    from automodel_cli.components.training.padding import Padding, run_padding
    from automodel_cli.components.training.progress import TrainingProgress
    from automodel_cli.components.training.sft_data import prepare_sft_data
    from automodel_cli.plugin_host import get_registries

    # 1. Processes and mesh. Mesh sizes are checked before anything is read or written.
    env, shape, say = processes(cfg)

    # 2. Where the run lives. A directory holding another run is refused before anything loads.
    output_dir = claim_output_dir(cfg, RECIPE, env)
    mesh, dp_size, dp_index = data_parallel(shape, env)
    registries = get_registries()
    # A kernel loss that cannot run here (package or GPU missing) stops the run now.
    loss_spec = build_loss(cfg, registries, env.device)
    accumulation = step_math.accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)

    # 3. Precision and seed (the same on every rank: identical initial weights).
    precision = seeded_precision(cfg, env, dp_size)

    # 4. Tokenizer and data (bad data fails before the model is loaded).
    tokenizer = load_tokenizer(cfg.model)
    sequence_parallel = cfg.distributed.sequence_parallel and shape.tp > 1
    data = prepare_sft_data(cfg, tokenizer, registries, say,
                            pad_to_multiple_of=shape.tp if sequence_parallel else None)

    # 5. Model, adapters, parallelism.
    model = load_model(cfg.model, seed=cfg.train.seed, dtype=precision.param_dtype)
    base_path = adapter_base(model, tokenizer, cfg, output_dir, env.is_main)
    model = prepare_model(model, cfg, precision=precision, mesh=mesh, shape=shape, registries=registries,
                          sequence_parallel=sequence_parallel)
    trainable, total = count_parameters(model)
    say(f"model: {cfg.model.path} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"{precision.describe()}, {shape.describe()})")

    # 6. Step math, optimizer and schedule (after parallelizing: parameters are now DTensors).
    plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method))
    # Padding in the run's micro-batches as collated (known up front: plans are pure functions).
    padding = run_padding(plan, data.train_lengths, cfg.train.micro_batch_size, range(total_steps), data.collate)
    run_padded = sum(padding, Padding())
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 7. Resume, then the run's files (rank 0 writes them).
    state = resume(cfg, output_dir, model=model, optimizer=optimizer, scheduler=scheduler, say=say,
                   is_main=env.is_main)
    start_step = int(state["step"])
    loggers = open_loggers(cfg, registries, output_dir, start_step, env.is_main)

    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k].to(precision.device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def forward(model_: Any, batch: dict[str, Any]) -> Any:  # full logits (evaluation)
        with precision.autocast():
            return model_(**model_inputs(batch), use_cache=False).logits

    def evaluate_now() -> dict[str, float] | None:
        # Every rank evaluates the same batches: sharded forward passes are collective.
        if not data.eval:
            return None
        return evaluate(model, data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches), forward)

    before = evaluate_now() if start_step == 0 else None
    if before:
        say(f"before training: {format_eval(before)}")

    # 8. The training loop: one iteration per optimizer step.
    say(f"training {total_steps - start_step} steps of {cfg.train.global_batch_size} "
        f"{'packs' if cfg.data.packing else 'samples'} ({accumulation} micro-batches of "
        f"{cfg.train.micro_batch_size} on each of {dp_size} data-parallel rank(s)) -> {output_dir}")
    say(f"padding: {run_padded.fraction:.1%} of the {run_padded.slots} token positions in the run's "
        f"micro-batches ({run_padded.padded} padded, {run_padded.tokens} real)")
    step, after = start_step, None
    stopping = False  # set once per step by checkpoint_due, agreed by every rank
    with GracefulStop() as stop, TrainingProgress(total_steps, start_step,
                                                  cfg.logging.progress and env.is_main) as progress:
        while step < total_steps and not stopping:
            started = time.perf_counter()
            samples = plan.samples(step)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            label_tokens = sum(data.train_label_tokens[i] for i in samples)
            loss_sum = torch.zeros((), device=precision.device)
            for group in groups[dp_index::dp_size]:  # this rank's share of the step
                batch = data.collate([data.train[i] for i in group])
                loss = training_loss(model, model_inputs(batch), batch["labels"], label_tokens, loss_spec,
                                     precision.autocast)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg.train.max_grad_norm)
            step += 1

            elapsed = time.perf_counter() - started
            tokens = sum(data.train_lengths[i] for i in samples)
            metrics = {"step": step, "loss": meshes.all_reduce_dp(loss_sum, mesh).item(), "lr": lr,
                       "grad_norm": grad_norm, "tokens": tokens, "label_tokens": label_tokens,
                       **step_rates(tokens, elapsed, env.world_size),
                       "padding_fraction": padding[step - 1].fraction,
                       "epoch": plan.epoch_of(step - 1)}
            after = log_step(cfg, step, total_steps, metrics, evaluate=evaluate_now, describe=format_eval,
                             loggers=loggers, progress=progress) or after
            save_now, stopping = checkpoint_due(cfg, step, total_steps, stop, env)
            if save_now:
                save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"step": step}, keep=cfg.checkpoint.keep, tokenizer=tokenizer)

    if (code := close_loop(loggers, stop, step, total_steps, output_dir, say)) is not None:
        return code  # stopped by a signal: the checkpoint above lets it resume

    # 9. Save Hugging Face outputs (gathered from every rank, written by rank 0).
    if after:
        say(f"after training:  {format_eval(after)}")
    save_outputs(model, tokenizer, cfg, env, output_dir, say, base_path=base_path,
                 summary={"steps": step, "before": before, "after": after,
                          "padding_fraction": run_padded.fraction, "padding": run_padded.as_dict()})
    return 0

