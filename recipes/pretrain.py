"""``automodel pretrain``: train a causal LM on raw text, from random weights or from a checkpoint.

The recipe supplies the tokenizer, the text cut into blocks, the model (random weights from the
config of ``model.path`` -- a preset, a model directory or a ``config.json`` file -- or, with
``model.from_scratch=false``, its weights) and the step; ``TrainingRun`` does the rest.

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

from typing import Any

from automodel_cli.errors import UserError

RECIPE = "pretrain"


def run(context: Any) -> int:
    import torch

    from automodel_cli.training.context_parallel import micro_batch_loss, whole_sequences
    from automodel_cli.components.models.loading import load_config, load_tokenizer
    from automodel_cli.training.run import StepOutput, TrainingRun
    from automodel_cli.training.text_data import prepare_text_data

    check_pretrain_settings(context.config)

    # 1. Processes, mesh, run directory, loss, precision (TrainingRun checks before anything loads).
    with TrainingRun(context) as run:
        cfg = run.cfg
        run.accumulation()  # global batch sizes that do not divide fail now

        # 2. Tokenizer, architecture and data (bad data fails before the model is built).
        tokenizer = load_tokenizer(cfg.model)
        architecture = load_config(cfg.model)
        block_size = cfg.data.max_length
        check_text_settings(run, tokenizer, architecture, block_size)
        eval_batch_size = cfg.train.micro_batch_size * 4
        data = prepare_text_data(cfg, tokenizer, run.registries, run.say, block_size, eval_batch_size)

        # 3. Model and parallelism, built empty and loaded (or seeded) shard by shard; the FLOPs
        #    count is taken on the bare model.
        model = run.load_model(tokenizer, flops_seq_len=block_size)
        run.describe_model(model, extra="random init, " if cfg.model.from_scratch else "pretrained weights, ")
        flops = run.flops
        run.say(f"FLOPs per token: {flops.total:.4g} (6 x {flops.matmul_parameters / 1e6:.2f}M matmul weights + "
                f"attention {flops.attention:.4g}); peak "
                f"{f'{run.peak:g} TFLOP/s ({run.peak_source})' if run.peak else 'unknown: MFU n/a'}")

        # 4. Steps, optimizer and schedule; resume (with the data position), then the run's files.
        total_steps = data.total_steps(cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        state = run.resume()
        data.restore(state, run.start_step)

        def validate() -> dict[str, float] | None:  # loss and perplexity on the validation blocks
            with whole_sequences(model, run.cp_size):  # every rank evaluates the same whole blocks
                return data.validate(run.evaluation_model(model), run.precision, eval_batch_size,
                                     cfg.train.eval_batches)

        def step(index: int) -> StepOutput:
            """One optimizer step's forward and backward passes on this rank's blocks."""
            blocks = data.step_blocks(index)
            label_tokens = sum(block["label_tokens"] for block in blocks)
            micro = cfg.train.micro_batch_size
            groups = [blocks[i:i + micro] for i in range(0, len(blocks), micro)]
            loss_sum = torch.zeros((), device=run.precision.device)
            mine = groups[run.dp_index::run.dp_size]
            if run.pipeline is not None:  # every stage's rank reads the same micro-batches
                loss_sum = run.pipeline.step([data.collate(group) for group in mine], label_tokens, micro, block_size)
                mine = []
            for group in mine:
                batch = data.collate(group)
                loss = micro_batch_loss(run, model, data.model_inputs(batch, run.precision.device), batch["labels"],
                                        label_tokens)
                loss.backward()
                loss_sum += loss.detach()
            return StepOutput({"loss": loss_sum}, tokens=len(blocks) * block_size,
                              metrics={"label_tokens": label_tokens, "epoch": data.epoch_of(index)})

        # 5. Train, after a first validation.
        run.announce(total_steps, f"blocks of {block_size} tokens")
        before = run.validate_before(validate, format_eval)
        result = run.train(step, total_steps=total_steps, evaluate=validate, describe=format_eval,
                           checkpoint_state=lambda index: {"data": data.state(index)}, tokenizer=tokenizer)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 6. A Hugging Face directory (gathered from every rank, written by rank 0).
        return run.finish(tokenizer, summary={
            "steps": result.step, "first_loss": result.first["loss"] if run.start_step == 0 and result.first else None,
            "last_loss": result.last["loss"] if result.last else None, "before": before, "after": result.after,
            "flops_per_token": flops.as_dict(), "peak_tflops": run.peak})


def check_pretrain_settings(cfg: Any) -> None:
    """Adapters train on frozen base weights: a random base makes no sense."""
    if cfg.model.from_scratch and cfg.peft.method != "none":
        raise UserError(
            f"peft.method={cfg.peft.method} trains adapters on frozen base weights, but "
            "model.from_scratch=true makes those weights random.",
            "Pre-train from scratch with full training (--peft none), or continue pre-training "
            "from weights with model.from_scratch=false.",
        )


def check_text_settings(run: Any, tokenizer: Any, architecture: Any, block_size: int) -> None:
    """Blocks fit the model and split evenly over a sequence- or context-parallel group; the
    tokenizer fits the vocabulary."""
    from automodel_cli.training.text_data import check_block_size

    check_block_size(block_size, architecture)
    multiple = run.pad_multiple
    if multiple and block_size % multiple:
        groups = " and ".join(part for part, on in (
            (f"sequence parallelism over tp={run.shape.tp} ranks", run.sequence_parallel),
            (f"context parallelism into {2 * run.shape.cp} chunks (cp={run.shape.cp})", run.shape.cp > 1)) if on)
        raise UserError(f"{groups[0].upper()}{groups[1:]} splits every block, but "
                        f"data.max_length={block_size} is not a multiple of {multiple}.",
                        f"Set data.max_length to a multiple of {multiple} (e.g. {-(-block_size // multiple) * multiple}).")
    if len(tokenizer) > architecture.vocab_size:
        raise UserError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {architecture.vocab_size}.",
            f"Use the model's own tokenizer, or from scratch set model.config.vocab_size={len(tokenizer)}.",
        )


def format_eval(result: dict[str, float]) -> str:
    return (f"eval loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}, "
            f"token accuracy {result['eval_token_accuracy']:.1%}")
