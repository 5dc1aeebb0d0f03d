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

import json
import math
import signal
import sys
import time
import warnings
from typing import Any

from automodel_cli.components.training.run_dir import prepare_output_dir, resume_requested, save_config

RECIPE = "finetune"


def run(cfg: Any) -> int:
    import torch

    from automodel_cli.components.checkpoint import GracefulStop, find_checkpoint, load_checkpoint, save_checkpoint
    from automodel_cli.components.distributed import env as dist_env
    from automodel_cli.components.distributed import mesh as meshes
    from automodel_cli.components.distributed.parallelize import (clip_grad_norm_, gather_full_state_dict,
                                                                  parallelize_model)
    from automodel_cli.components.logging import JsonlLogger, truncate_after
    from automodel_cli.components.models.loading import load_model, load_tokenizer, resolve_model_source
    from automodel_cli.components.models.saving import save_final
    from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr
    from automodel_cli.components.peft.lora import apply_peft, count_parameters
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import evaluate
    from automodel_cli.components.training.loggers import build_loggers
    from automodel_cli.components.training.memory import enable_activation_checkpointing
    from automodel_cli.components.training.precision import Precision
    from automodel_cli.components.training.progress import TrainingProgress
    from automodel_cli.components.training.sft_data import prepare_sft_data
    from automodel_cli.plugin_host import get_registries

    # 1. Processes and mesh. Mesh sizes are checked before anything is read or written.
    env = dist_env.init_distributed()
    shape = meshes.MeshShape.resolve(cfg.distributed.dp_replicate, cfg.distributed.dp_shard,
                                     cfg.distributed.tp, world_size=env.world_size)
    say = _printer(env.is_main)

    # 2. Where the run lives. A directory holding another run is refused before anything loads.
    output_dir = prepare_output_dir(cfg, RECIPE)
    cfg.tree["output_dir"] = str(output_dir)
    _barrier(env)  # every rank has vetted the directory before rank 0 writes into it
    mesh = meshes.build_mesh(shape, env.device.type)
    dp_size, dp_index = meshes.dp_world_size(mesh), meshes.dp_rank(mesh)
    registries = get_registries()
    loss_fn = registries.losses.get(cfg.loss.name).load()
    accumulation = step_math.accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)

    # 3. Precision and seed (the same on every rank: identical initial weights).
    torch.manual_seed(cfg.train.seed)
    precision = Precision.choose(cfg.model.dtype, cfg.peft.method, env.device, sharded=dp_size > 1)

    # 4. Tokenizer and data (bad data fails before the model is loaded).
    tokenizer = load_tokenizer(cfg.model)
    sequence_parallel = cfg.distributed.sequence_parallel and shape.tp > 1
    data = prepare_sft_data(cfg, tokenizer, registries, say,
                            pad_to_multiple_of=shape.tp if sequence_parallel else None)

    # 5. Model, adapters, parallelism.
    model = load_model(cfg.model, seed=cfg.train.seed, dtype=precision.param_dtype)
    base_dir = None
    if cfg.model.from_scratch and cfg.peft.method != "none":
        # An adapter needs its base weights: keep the random base beside the run.
        base_dir = output_dir / "base_model"
        if env.is_main:
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
    distributed = mesh is not None
    if cfg.train.activation_checkpointing and not distributed:
        enable_activation_checkpointing(model)
    model = apply_peft(model, cfg.peft)
    model.to(precision.device)
    model.train()
    if distributed:
        model = parallelize_model(
            model, mesh, plan_registry=registries.parallel_plans, tp=shape.tp,
            sequence_parallel=sequence_parallel,
            activation_checkpointing=cfg.train.activation_checkpointing,
            mixed_precision=precision.autocast_dtype is not None)
    trainable, total = count_parameters(model)
    say(f"model: {cfg.model.path} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"{precision.describe()}, {shape.describe()})")

    # 6. Step math, optimizer and schedule (after parallelizing: parameters are now DTensors).
    plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 7. Resume, then the run's files (rank 0 writes them).
    start_step = 0
    checkpoint = find_checkpoint(cfg.checkpoint.resume, output_dir) if resume_requested(cfg) else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        say(f"resumed from {checkpoint} at step {start_step}")
    loggers: list[Any] = []
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir)
        metrics_path = output_dir / "metrics.jsonl"
        truncate_after(metrics_path, start_step)
        loggers = [JsonlLogger(metrics_path), *build_loggers(cfg, registries, output_dir)]

    def forward(model_: Any, batch: dict[str, Any]) -> Any:
        inputs = {k: batch[k].to(precision.device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with precision.autocast():
            return model_(**inputs, use_cache=False).logits

    def evaluate_now() -> dict[str, float] | None:
        # Every rank evaluates the same batches: sharded forward passes are collective.
        if not data.eval:
            return None
        return evaluate(model, data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches), forward)

    before = evaluate_now() if start_step == 0 else None
    if before:
        say(f"before training: {_format_eval(before)}")

    # 8. The training loop: one iteration per optimizer step.
    say(f"training {total_steps - start_step} steps of {cfg.train.global_batch_size} "
        f"{'packs' if cfg.data.packing else 'samples'} ({accumulation} micro-batches of "
        f"{cfg.train.micro_batch_size} on each of {dp_size} data-parallel rank(s)) -> {output_dir}")
    step, after = start_step, None
    with GracefulStop() as stop, TrainingProgress(total_steps, start_step,
                                                  cfg.logging.progress and env.is_main) as progress:
        while step < total_steps and not _any_rank(stop.requested, env):
            started = time.perf_counter()
            samples = plan.samples(step)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            label_tokens = sum(data.train_label_tokens[i] for i in samples)
            loss_sum = torch.zeros((), device=precision.device)
            for group in groups[dp_index::dp_size]:  # this rank's share of the step
                batch = data.collate([data.train[i] for i in group])
                loss = loss_fn(forward(model, batch), batch["labels"].to(precision.device), label_tokens)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - started
            tokens = sum(data.train_lengths[i] for i in samples)
            metrics = {"step": step, "loss": meshes.all_reduce_dp(loss_sum, mesh).item(), "lr": lr,
                       "grad_norm": grad_norm, "tokens": tokens, "label_tokens": label_tokens,
                       "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / env.world_size,
                       "epoch": plan.epoch_of(step - 1)}
            if not math.isfinite(metrics["loss"]):
                progress.log(f"warning: loss is {metrics['loss']} at step {step}")
            every_eval = cfg.train.eval_every_steps
            if step == total_steps or (every_eval and step % every_eval == 0):
                if (after := evaluate_now()) is not None:
                    metrics.update(after)
                    if step < total_steps:
                        progress.log(f"step {step}: {_format_eval(after)}")
            for logger in loggers:
                logger.log(metrics, step)
            progress.update(step, metrics)
            every = cfg.checkpoint.every_steps
            stopping = step < total_steps and _any_rank(stop.requested, env)
            if (every and step % every == 0) or stopping:
                save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"step": step}, keep=cfg.checkpoint.keep, tokenizer=tokenizer)

    for logger in loggers:
        logger.close()
    if step < total_steps:  # stopped by a signal: the checkpoint above lets it resume
        say(f"stopped at step {step}/{total_steps}; a checkpoint was saved. Continue with "
            f"checkpoint.resume=auto --output-dir {output_dir}")
        return 128 + int(getattr(signal, stop.signal_name or "SIGTERM"))

    # 9. Save Hugging Face outputs (gathered from every rank, written by rank 0).
    if after:
        say(f"after training:  {_format_eval(after)}")
    state_dict = gather_full_state_dict(model, trainable_only=cfg.peft.method != "none") if distributed else None
    if env.is_main:
        base_path = base_dir.resolve() if base_dir else resolve_model_source(cfg.model.path)
        final_dir = save_final(model, tokenizer, output_dir, merge=cfg.peft.merge,
                               base_path=base_path, state_dict=state_dict)
        summary = {"steps": step, "output_dir": str(output_dir), "final": str(final_dir),
                   "before": before, "after": after}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"saved {final_dir}")
    _barrier(env)
    dist_env.destroy()
    return 0


def _barrier(env: Any) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def _any_rank(flag: bool, env: Any) -> bool:
    """True on every rank once any rank has it: ranks must stop at the same step."""
    if not env.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _format_eval(result: dict[str, float]) -> str:
    return (f"eval loss {result['eval_loss']:.4f}, exact match {result['eval_exact_match']:.1%}, "
            f"token accuracy {result['eval_token_accuracy']:.1%} ({result['eval_samples']} samples)")


def _printer(enabled: bool):
    """Print on rank 0 only, so a multi-process run reads like a single one."""
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stdout, flush=True)

    warnings.simplefilter("default")
    return say
