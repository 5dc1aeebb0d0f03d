"""``automodel finetune``: supervised fine-tuning of a causal LM, full or with LoRA/DoRA.

The recipe reads top to bottom: pick the output directory, load the tokenizer and model, add
adapters, prepare the data, build the optimizer, resume if asked, train, evaluate, save a
Hugging Face directory. Each step is a call into ``automodel_cli.components``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from automodel_cli.components.training.run_dir import prepare_output_dir, resume_requested, save_config

RECIPE = "finetune"


def run(cfg: Any) -> int:
    import torch

    from automodel_cli.components.checkpoint import GracefulStop, find_checkpoint, load_checkpoint, save_checkpoint
    from automodel_cli.components.logging import JsonlLogger, truncate_after
    from automodel_cli.components.models.loading import load_model, load_tokenizer
    from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr
    from automodel_cli.components.peft.lora import apply_peft, count_parameters
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import evaluate
    from automodel_cli.components.training.loggers import build_loggers
    from automodel_cli.components.training.memory import enable_activation_checkpointing
    from automodel_cli.components.training.precision import Precision
    from automodel_cli.components.training.sft_data import prepare_sft_data
    from automodel_cli.plugin_host import get_registries

    say = _printer()

    # 1. Where the run lives. A directory holding another run is refused before anything loads.
    output_dir = prepare_output_dir(cfg, RECIPE)
    cfg.tree["output_dir"] = str(output_dir)
    registries = get_registries()
    loss_fn = registries.losses.get(cfg.loss.name).load()

    # 2. Precision and seed.
    torch.manual_seed(cfg.train.seed)
    precision = Precision.choose(cfg.model.dtype, cfg.peft.method)

    # 3. Tokenizer, data (so that bad data fails before the model is loaded).
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_sft_data(cfg, tokenizer, registries, say)

    # 4. Model and adapters.
    model = load_model(cfg.model, seed=cfg.train.seed, dtype=precision.param_dtype)
    base_dir = None
    if cfg.model.from_scratch and cfg.peft.method != "none":
        # An adapter needs its base weights: keep the random base beside the run.
        base_dir = output_dir / "base_model"
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = apply_peft(model, cfg.peft)
    model.to(precision.device)
    model.train()
    trainable, total = count_parameters(model)
    say(f"model: {cfg.model.path} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"{precision.describe()})")

    # 5. Step math, optimizer and schedule.
    accumulation = step_math.accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 6. Resume.
    start_step = 0
    checkpoint = find_checkpoint(cfg.checkpoint.resume, output_dir) if resume_requested(cfg) else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        say(f"resumed from {checkpoint} at step {start_step}")
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
        if not data.eval:
            return None
        return evaluate(model, data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches), forward)

    before = evaluate_now() if start_step == 0 else None
    if before:
        say(f"before training: {_format_eval(before)}")

    # 7. The training loop: one iteration per optimizer step.
    say(f"training {total_steps - start_step} steps of {cfg.train.global_batch_size} "
        f"{'packs' if cfg.data.packing else 'samples'} ({accumulation} micro-batches of "
        f"{cfg.train.micro_batch_size}) -> {output_dir}")
    from automodel_cli.components.training.progress import TrainingProgress

    step = start_step
    after = None
    with GracefulStop() as stop, TrainingProgress(total_steps, start_step, cfg.logging.progress) as progress:
        while step < total_steps and not stop.requested:
            started = time.perf_counter()
            groups = step_math.micro_batches(plan.samples(step), data.train_lengths, cfg.train.micro_batch_size)
            batches = [data.collate([data.train[i] for i in group]) for group in groups]
            label_tokens = sum(int(b["num_label_tokens"]) for b in batches)
            loss_sum = torch.zeros((), device=precision.device)
            for batch in batches:
                logits = forward(model, batch)
                loss = loss_fn(logits, batch["labels"].to(precision.device), label_tokens)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = _clip(model, cfg.train.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - started
            tokens = sum(data.train_lengths[i] for i in plan.samples(step - 1))
            metrics = {"step": step, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm,
                       "tokens": tokens, "label_tokens": label_tokens,
                       "tokens_per_s": tokens / elapsed, "epoch": plan.epoch_of(step - 1)}
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
            if (every and step % every == 0) or (stop.requested and step < total_steps):
                save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"step": step}, keep=cfg.checkpoint.keep)

    for logger in loggers:
        logger.close()
    if step < total_steps:  # stopped by a signal: the checkpoint above lets it resume
        say(f"stopped at step {step}/{total_steps}; a checkpoint was saved. Continue with "
            f"checkpoint.resume=auto --output-dir {output_dir}")
        return 128 + int(getattr(signal, stop.signal_name or "SIGTERM"))

    # 8. Save Hugging Face outputs.
    if after:
        say(f"after training:  {_format_eval(after)}")
    from automodel_cli.components.models.saving import save_final

    final_dir = save_final(model, tokenizer, output_dir, merge=cfg.peft.merge, base_dir=base_dir)
    summary = {"steps": step, "output_dir": str(output_dir), "final": str(final_dir)}
    if before:
        summary["before"] = before
    if after:
        summary["after"] = after
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"saved {final_dir}")
    return 0


def _clip(model: Any, max_norm: float | None) -> float:
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return float(norm)


def _format_eval(result: dict[str, float]) -> str:
    return (f"eval loss {result['eval_loss']:.4f}, exact match {result['eval_exact_match']:.1%}, "
            f"token accuracy {result['eval_token_accuracy']:.1%} ({result['eval_samples']} samples)")


def _printer():
    def say(message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    warnings.simplefilter("default")
    return say
