"""``automodel distill``: knowledge distillation from a frozen teacher into a student causal LM.

The student is trained exactly as ``automodel finetune`` trains a model (same config, data
pipeline, LoRA/DoRA, parallelism, checkpoints, resume, loggers, outputs); the only change is the
loss. Each micro-batch goes through the student and, without gradients, through the teacher;
the loss is

    loss = (1 - w) * CE + w * T**2 * KL_T

with ``w = distill.kd_weight``, ``T = distill.temperature``, CE the registry loss ``loss.name``
on the labels and ``KL_T`` the token-level KL divergence between the temperature-scaled
teacher and student distributions (``distill.kl``: forward ``KL(teacher || student)`` or
reverse), both over the trained (completion) tokens only and normalised by the step's
label-token count (``components/loss/kd.py``), so losses match on 1 or N processes.

The teacher (``training/teacher.py``) is loaded from ``distill.teacher_path`` (for the demo
student, when none is given, the cached demo teacher: ``training/demo_teacher.py``), frozen
(``requires_grad=False``, eval mode), has no optimizer and is never checkpointed or saved; on N
processes it is parallelised on the student's mesh (TP plan, then FSDP2 with parameters
resharded after every forward). Before any data, model or file is touched, the teacher's
vocabulary is checked against the student's. ``TrainingRun`` does the rest, as for finetune.

Memory: with a fused ``loss.name`` (``linear_ce``) the student's logits are never materialised:
the teacher yields its logits at the trained positions only, and CE and KL are computed chunk by
chunk from the student's hidden states and LM head (``kd.linear_distillation_loss``; the same
values as the full-logits path). Otherwise both models' full logits are computed.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.config.schema import option

RECIPE = "distill"
#: The recipe's own config section, ``distill`` (read by this recipe only).
CONFIG = {"distill": {
    "teacher_path": option((str, type(None)), None, "Teacher for `automodel distill`: Hugging Face hub id or local model directory; frozen, never saved. Must share the student's vocabulary."),
    "teacher_revision": option((str, type(None)), None, "Hub revision (branch, tag or commit) of distill.teacher_path."),
    "teacher_tokenizer": option((str, type(None)), None, "Teacher tokenizer compared with the student's before training; defaults to distill.teacher_path (skipped when that has none)."),
    "teacher_dtype": option(str, "auto", "Teacher weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
                           choices=("auto", "float32", "bfloat16", "float16")),
    "temperature": option((int, float), 1.0, "Softmax temperature T of teacher and student logits in the KL term.", gt=0),
    "kd_weight": option((int, float), 0.5, "Weight w of distillation: loss = (1 - w) * CE + w * T^2 * KL_T; 1: distillation only, 0: plain fine-tuning.", ge=0, le=1),
    "kl": option(str, "forward", "KL direction: forward KL(teacher||student) (classic KD) or reverse KL(student||teacher) (mode-seeking).",
             choices=("forward", "reverse")),
}}


def run(context: Any) -> int:
    import torch

    from automodel_cli.components.loss.head import distillation_training_loss, fusable_head
    from automodel_cli.components.moe.balance import router_terms
    from automodel_cli.components.loss.kd import distillation_loss, kd_loss
    from automodel_cli.components.models.loading import load_config, load_tokenizer
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import IGNORE_INDEX, evaluate, format_eval
    from automodel_cli.training import teacher as teachers
    from automodel_cli.training.run import StepOutput, TrainingRun
    from automodel_cli.training.sft_data import model_inputs, prepare_sft_data

    # 1. The teacher's settings (a resumed run keeps its teacher and KD settings), before anything.
    cfg = context.config
    demo_entry = teachers.use_demo_teacher(cfg, context.registries)
    teachers.check_teacher_settings(cfg)

    # 2. Processes, mesh, run directory, loss (the CE term), precision.
    with TrainingRun(context) as run:
        run.accumulation()  # global batch sizes that do not divide fail now
        if demo_entry is not None:
            teachers.provide_demo_teacher(demo_entry, run.env, run.say)

        # 3. Tokenizer, the teacher's vocabulary, then data: every mismatch fails before a model loads.
        tokenizer = load_tokenizer(cfg.model)
        teacher_cfg = teachers.teacher_model_config(cfg)
        vocab_size = teachers.check_vocabularies(load_config(cfg.model), tokenizer, teacher_cfg, run.say)
        data = prepare_sft_data(cfg, tokenizer, run.registries, run.say,
                                pad_to_multiple_of=run.shape.tp if run.sequence_parallel else None)

        # 4. The student, exactly as finetune; the teacher, frozen on the same mesh.
        model = run.load_model(tokenizer)
        run.describe_model(model, "student")
        teacher = teachers.FrozenTeacher(teacher_cfg, run)
        kd_weight, temperature = float(cfg.distill.kd_weight), float(cfg.distill.temperature)
        run.say(f"teacher: {cfg.distill.teacher_path} ({teacher.describe()}); loss = {1 - kd_weight:g} * "
                f"{cfg.loss.name} + {kd_weight:g} * {temperature:g}^2 * {cfg.distill.kl} KL at temperature "
                f"{temperature:g}")

        # 5. Steps, optimizer and schedule; resume (checkpoints never hold the teacher), the run's files.
        plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        run.resume()
        loss_spec = run.loss_spec

        def inputs(batch: dict[str, Any]) -> dict[str, Any]:
            return model_inputs(batch, run.precision.device)

        def forward(model_: Any, batch: dict[str, Any]) -> Any:
            with run.precision.autocast():
                return model_(**inputs(batch), use_cache=False).logits

        def kl_of(logits: Any, teacher_logits: Any, labels: Any, normaliser: Any, temperature_: float) -> Any:
            return kd_loss(logits, teacher_logits, labels, normaliser, temperature=temperature_,
                           direction=cfg.distill.kl, vocab_size=vocab_size)

        fusion: dict[str, bool] = {}  # whether the first micro-batch could fuse the heads (said once)

        def fused_terms(batch: dict[str, Any], labels: Any, label_tokens: int) -> tuple[Any, Any, Any] | None:
            """CE and KL from the student's hidden states and LM head, chunk by chunk (a fused
            ``loss.name`` such as linear_ce); None when the heads cannot be fused."""
            terms = distillation_training_loss(model, teacher.model, inputs(batch), labels, label_tokens,
                                               loss_spec, run.precision.autocast, kd_weight=kd_weight,
                                               temperature=temperature, direction=cfg.distill.kl, vocab_size=vocab_size)
            fusion.setdefault("fused", terms is not None)
            return terms

        def full_logits_terms(batch: dict[str, Any], labels: Any, label_tokens: int) -> tuple[Any, Any, Any]:
            logits = forward(model, batch)
            teacher_logits = teacher.logits(inputs(batch))
            with torch.set_grad_enabled(kd_weight < 1):  # a term of weight 0 needs no graph
                ce = loss_spec.logits_fn(logits, labels, label_tokens)
            with torch.set_grad_enabled(kd_weight > 0):
                kl = kl_of(logits, teacher_logits, labels, label_tokens, temperature)
            return distillation_loss(ce, kl, kd_weight=kd_weight, temperature=temperature), ce, kl

        def fusion_note() -> str | None:
            if loss_spec.distillation is None or "fused" not in fusion:
                return None
            if fusion["fused"]:
                return "fused head: CE and KL from the student's hidden states, chunk by chunk (no full logits)"
            reason = fusable_head(model)[1] or fusable_head(teacher.model)[1] or "unknown reason"
            return f"full logits for {cfg.loss.name}: the LM heads cannot be fused ({reason})"

        def step(index: int) -> StepOutput:
            """One optimizer step on this rank's micro-batches: loss, CE and KL."""
            samples = plan.samples(index)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            label_tokens = sum(data.train_label_tokens[i] for i in samples)
            sums = torch.zeros(3, device=run.precision.device)  # loss, CE and KL of this rank's share
            for group in groups[run.dp_index::run.dp_size]:
                batch = data.collate([data.train[i] for i in group])
                labels = batch["labels"].to(run.precision.device)
                with router_terms(model, inputs(batch), labels) as with_router_terms:  # a mixture of experts' balance loss
                    loss, ce, kl = fused_terms(batch, labels, label_tokens) or full_logits_terms(batch, labels, label_tokens)
                    loss = with_router_terms(loss)
                loss.backward()
                sums += torch.stack([loss.detach(), ce.detach(), kl.detach()]).float()
            return StepOutput({"loss": sums[0], "ce_loss": sums[1], "kl": sums[2]},
                              tokens=sum(data.train_lengths[i] for i in samples),
                              metrics={"label_tokens": label_tokens, "epoch": plan.epoch_of(index)})

        def eval_batches() -> Any:
            return data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches)

        def validate() -> dict[str, float] | None:
            """The student's validation metrics plus ``eval_kl``: its KL to the teacher (``distill.kl``
            direction, temperature 1) per trained token. Every rank evaluates the same batches."""
            if not data.eval:
                return None
            totals = {"kl": 0.0, "tokens": 0}

            def forward_and_compare(model_: Any, batch: dict[str, Any]) -> Any:
                logits = forward(model_, batch)
                labels = batch["labels"].to(run.precision.device)
                totals["kl"] += kl_of(logits, teacher.logits(inputs(batch)), labels, 1, 1.0).item()
                totals["tokens"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
                return logits

            result = evaluate(model, eval_batches(), forward_and_compare)
            return {**result, "eval_kl": totals["kl"] / max(1, totals["tokens"])}

        # 6. Train, validating the teacher once and the student before, during and after.
        before = teacher_eval = None
        if run.start_step == 0 and data.eval:
            teacher_eval = evaluate(teacher.model, eval_batches(),
                                    lambda _teacher, batch: teacher.logits(inputs(batch)))
            run.say(f"teacher:         {format_eval(teacher_eval)}")
            before = run.validate_before(validate, format_distill_eval)
        run.announce(total_steps, "packs" if cfg.data.packing else "samples")
        result = run.train(step, total_steps=total_steps, evaluate=validate, describe=format_distill_eval,
                           tokenizer=tokenizer, after_first_step=fusion_note)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 7. The student as Hugging Face outputs (gathered from every rank, written by rank 0).
        return run.finish(tokenizer, summary={"steps": result.step, "teacher": cfg.distill.teacher_path,
                                   "teacher_eval": teacher_eval, "before": before, "after": result.after})


def format_distill_eval(result: dict[str, float]) -> str:
    from automodel_cli.components.training.evaluation import format_eval

    return f"{format_eval(result)}, KL to teacher {result['eval_kl']:.4f}"
