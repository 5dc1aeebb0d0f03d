"""``automodel pretrain``: train a causal LM on raw text, from random weights or from a checkpoint.

The recipe reads top to bottom like finetune: set up the processes and the device mesh, pick the
output directory, load the tokenizer and cut the text into blocks, build the model (random
weights from the config of ``model.path`` -- a preset, a model directory or a ``config.json``
file -- or, with ``model.from_scratch=false``, its weights), build the optimizer, resume if
asked, train, save a Hugging Face directory.

Text is tokenised, documents are separated by EOS and the token stream is cut into blocks of
``data.max_length`` tokens with attention kept inside each document (components/data/text.py).
One optimizer step reads ``train.global_batch_size`` blocks whatever the number of processes;
each data-parallel rank takes an equal share of the step's micro-batches and normalises its loss
by the step's trained-token count. Map-style data (files, hub datasets, ``automodel data
pretokenize`` caches) is shuffled per epoch by seed, so a step's blocks follow from the step;
streaming data (``data.streaming=true``) is read in order and its position is saved with every
checkpoint, so ``checkpoint.resume=auto`` continues at exactly the next block.

Every step logs tokens/s, TFLOP/s and MFU per device (components/training/flops.py).
"""

from __future__ import annotations

import time
from typing import Any

from automodel_cli.errors import UserError

RECIPE = "pretrain"


def run(cfg: Any) -> int:
    import torch

    from automodel_cli.components.checkpoint import GracefulStop, save_checkpoint
    from automodel_cli.components.distributed import mesh as meshes
    from automodel_cli.components.loss.head import training_loss
    from automodel_cli.components.models.loading import load_config, load_model, load_tokenizer, resolve_model_source
    from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr
    from automodel_cli.components.peft.lora import count_parameters
    from automodel_cli.components.training import flops as flops_math
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.loop import (build_loss, checkpoint_due, claim_output_dir,
                                                        close_loop, data_parallel, log_step, open_loggers,
                                                        optimizer_step, processes, resume, save_outputs,
                                                        seeded_precision, step_rates)
    from automodel_cli.components.training.model_setup import init_device, prepare_model
    from automodel_cli.components.training.progress import TrainingProgress
    from automodel_cli.components.training.text_data import check_block_size, prepare_text_data
    from automodel_cli.plugin_host import get_registries

    # 1. Processes and mesh shape (checked before anything is read or written).
    env, shape, say = processes(cfg)
    if cfg.model.from_scratch and cfg.peft.method != "none":
        raise UserError(
            f"peft.method={cfg.peft.method} trains adapters on frozen base weights, but "
            "model.from_scratch=true makes those weights random.",
            "Pre-train from scratch with full training (--peft none), or continue pre-training "
            "from weights with model.from_scratch=false.",
        )

    # 2. Where the run lives (a directory holding another run is refused), the mesh, the loss.
    output_dir = claim_output_dir(cfg, RECIPE, env)
    mesh, dp_size, dp_index = data_parallel(shape, env)
    registries = get_registries()
    loss_spec = build_loss(cfg, registries, env.device)
    accumulation = step_math.accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)
    precision = seeded_precision(cfg, env, dp_size)  # the same seed everywhere: identical initial weights

    # 3. Tokenizer, architecture and data (bad data fails before the model is built).
    tokenizer = load_tokenizer(cfg.model)
    architecture = load_config(cfg.model)
    block_size = cfg.data.max_length
    check_block_size(block_size, architecture)
    sequence_parallel = cfg.distributed.sequence_parallel and shape.tp > 1
    if sequence_parallel and block_size % shape.tp:
        raise UserError(f"Sequence parallelism splits every block over tp={shape.tp} ranks, but "
                        f"data.max_length={block_size} is not a multiple of {shape.tp}.",
                        f"Set data.max_length to a multiple of {shape.tp}.")
    if len(tokenizer) > architecture.vocab_size:
        raise UserError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{architecture.vocab_size}.",
            f"Use the model's own tokenizer, or from scratch set model.config.vocab_size={len(tokenizer)}.",
        )
    eval_batch_size = cfg.train.micro_batch_size * 4
    data = prepare_text_data(cfg, tokenizer, registries, say, block_size, eval_batch_size)

    # 4. Model and parallelism; the FLOPs count is taken before the model is sharded.
    with init_device(cfg, precision.device):
        model = load_model(cfg.model, seed=cfg.train.seed, dtype=precision.param_dtype)
    flops = flops_math.flops_per_token(model, model.config, block_size)
    peak, peak_source = flops_math.peak_tflops(env.device, cfg.train.peak_tflops)
    model = prepare_model(model, cfg, precision=precision, mesh=mesh, shape=shape, registries=registries,
                          sequence_parallel=sequence_parallel)
    trainable, total = count_parameters(model)
    say(f"model: {cfg.model.path} ({'random init' if cfg.model.from_scratch else 'pretrained weights'}, "
        f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, {precision.describe()}, "
        f"{shape.describe()})")
    say(f"FLOPs per token: {flops.total:.4g} (6 x {flops.matmul_parameters / 1e6:.2f}M matmul weights + "
        f"attention {flops.attention:.4g}); peak {f'{peak:g} TFLOP/s ({peak_source})' if peak else 'unknown: MFU n/a'}")

    # 5. Steps, optimizer and schedule (after parallelizing: parameters are now DTensors).
    total_steps = data.total_steps(cfg.train.max_steps, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 6. Resume (model, optimizer, schedule, RNG and the data position), then the run's files.
    state = resume(cfg, output_dir, model=model, optimizer=optimizer, scheduler=scheduler, say=say,
                   is_main=env.is_main)
    start_step = int(state["step"])
    data.restore(state, start_step)
    loggers = open_loggers(cfg, registries, output_dir, start_step, env.is_main)

    def evaluate_now() -> dict[str, float] | None:  # loss and perplexity on the validation blocks
        return data.validate(model, precision, eval_batch_size, cfg.train.eval_batches)

    # 7. The training loop: one iteration per optimizer step, after a first validation.
    say(f"training {total_steps - start_step} steps of {cfg.train.global_batch_size} blocks of {block_size} "
        f"tokens ({accumulation} micro-batches of {cfg.train.micro_batch_size} on each of {dp_size} "
        f"data-parallel rank(s)) -> {output_dir}")
    if (before := evaluate_now() if start_step == 0 else None) is not None:
        say(f"before training: {_format_eval(before)}")
    step, after, first_loss, loss = start_step, None, None, None
    stopping = False  # set once per step by checkpoint_due, agreed by every rank
    with GracefulStop() as stop, TrainingProgress(total_steps, start_step,
                                                  cfg.logging.progress and env.is_main) as progress:
        while step < total_steps and not stopping:
            started = time.perf_counter()
            blocks = data.step_blocks(step)
            label_tokens = sum(block["label_tokens"] for block in blocks)
            micro = cfg.train.micro_batch_size
            groups = [blocks[i:i + micro] for i in range(0, len(blocks), micro)]
            loss_sum = torch.zeros((), device=precision.device)
            for group in groups[dp_index::dp_size]:  # this rank's share of the step
                batch = data.collate(group)
                micro_loss = training_loss(model, data.model_inputs(batch, precision.device), batch["labels"],
                                           label_tokens, loss_spec, precision.autocast)
                micro_loss.backward()
                loss_sum += micro_loss.detach()
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg.train.max_grad_norm)
            step += 1

            elapsed = time.perf_counter() - started
            tokens = len(blocks) * block_size
            tflops, mfu = flops_math.achieved(flops.total * tokens, elapsed, env.world_size, peak)
            loss = meshes.all_reduce_dp(loss_sum, mesh).item()
            first_loss = loss if step == 1 else first_loss
            metrics = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                       "label_tokens": label_tokens, **step_rates(tokens, elapsed, env.world_size),
                       "tflops_per_device": tflops, "mfu": mfu, "epoch": data.epoch_of(step - 1)}
            after = log_step(cfg, step, total_steps, metrics, evaluate=evaluate_now, describe=_format_eval,
                             loggers=loggers, progress=progress) or after
            save_now, stopping = checkpoint_due(cfg, step, total_steps, stop, env)
            if save_now:
                save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"step": step, "data": data.state(step)},
                                keep=cfg.checkpoint.keep, tokenizer=tokenizer)

    if (code := close_loop(loggers, stop, step, total_steps, output_dir, say)) is not None:
        return code  # stopped by a signal: the checkpoint above lets it resume

    # 8. Save a Hugging Face directory (gathered from every rank, written by rank 0).
    if after:
        say(f"after training:  {_format_eval(after)}")
    save_outputs(model, tokenizer, cfg, env, output_dir, say, base_path=resolve_model_source(cfg.model.path),
                 summary={"steps": step, "first_loss": first_loss, "last_loss": loss, "before": before,
                          "after": after, "flops_per_token": flops.as_dict(), "peak_tflops": peak})
    return 0


def _format_eval(result: dict[str, float]) -> str:
    return (f"eval loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}, "
            f"token accuracy {result['eval_token_accuracy']:.1%}")
