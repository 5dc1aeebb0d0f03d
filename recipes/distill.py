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

The teacher is loaded from ``distill.teacher_path`` (for the demo student, when none is given,
the cached demo teacher: ``components/training/demo_teacher.py``), frozen
(``requires_grad=False``, eval mode), has no optimizer and is never checkpointed or saved; on N
processes it is parallelised on the student's mesh (TP plan, then FSDP2 with parameters
resharded after every forward). Before any data, model or file is touched, the teacher's
vocabulary is checked against the student's.

Memory: with a fused ``loss.name`` (``linear_ce``) the student's logits are never materialised:
the teacher yields its logits at the trained positions only, and CE and KL are computed chunk by
chunk from the student's hidden states and LM head (``kd.linear_distillation_loss``; the same
values as the full-logits path). Otherwise both models' full logits are computed.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from automodel_cli.components.models.model_files import Role
from automodel_cli.components.training.run_dir import CONFIG_FILE, resume_requested
from automodel_cli.config.schema import option
from automodel_cli.errors import UserError

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
#: Settings a resumed distillation must share with the run it continues (besides finetune's).
TEACHER_IDENTITY_KEYS = ("distill.teacher_path", "distill.teacher_revision", "distill.temperature",
                         "distill.kd_weight", "distill.kl")
#: Messages about the teacher name the distill keys. Custom code is allowed by the one
#: model.trust_remote_code key, which covers both models.
TEACHER = Role(name="teacher", path_key="distill.teacher_path", tokenizer_key="distill.teacher_tokenizer",
               trust_note=" (the teacher has no key of its own: model.trust_remote_code applies to the student "
                          "and the teacher)",
               from_scratch_key=None)


def run(cfg: Any) -> int:
    import torch

    from automodel_cli.components.checkpoint import GracefulStop, save_checkpoint
    from automodel_cli.components.distributed import mesh as meshes
    from automodel_cli.components.distributed.parallelize import parallelize_model
    from automodel_cli.components.loss.head import distillation_training_loss, fusable_head
    from automodel_cli.components.loss.kd import distillation_loss, kd_loss
    from automodel_cli.components.models.loading import load_config, load_model, load_tokenizer, torch_dtype
    from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr
    from automodel_cli.components.peft.lora import count_parameters
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.evaluation import IGNORE_INDEX, evaluate
    from automodel_cli.components.training.loop import (build_loss, checkpoint_due, claim_output_dir,
                                                        close_loop, data_parallel, log_step, open_loggers,
                                                        optimizer_step, processes, resume, save_outputs,
                                                        seeded_precision, step_rates)
    from automodel_cli.components.training.model_setup import adapter_base, prepare_model
    from automodel_cli.components.training.progress import TrainingProgress
    from automodel_cli.components.training.sft_data import prepare_sft_data
    from automodel_cli.plugin_host import get_registries
    from automodel_cli.components.training.evaluation import format_eval

    # 1. Settings, processes and mesh: checked before anything is read or written.
    demo_teacher = use_demo_teacher(cfg)
    check_distill_settings(cfg)
    env, shape, say = processes(cfg)

    # 2. Where the run lives (a resumed run must also keep its teacher and KD settings).
    if resume_requested(cfg) and cfg.output_dir:
        check_same_distillation(cfg, Path(cfg.output_dir))
    output_dir = claim_output_dir(cfg, RECIPE, env)
    if demo_teacher is not None:
        provide_demo_teacher(demo_teacher, env, say)
    mesh, dp_size, dp_index = data_parallel(shape, env)
    registries = get_registries()
    loss_spec = build_loss(cfg, registries, env.device)  # the CE term: loss.name
    accumulation = step_math.accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)

    # 3. Precision and seed (the same on every rank: identical initial weights).
    precision = seeded_precision(cfg, env, dp_size)

    # 4. Tokenizer, the teacher's vocabulary, then data: every mismatch fails before a model loads.
    tokenizer = load_tokenizer(cfg.model)
    teacher_cfg = teacher_model_config(cfg)
    vocab_size = check_vocabularies(load_config(cfg.model), tokenizer, teacher_cfg, say)
    sequence_parallel = cfg.distributed.sequence_parallel and shape.tp > 1
    data = prepare_sft_data(cfg, tokenizer, registries, say,
                            pad_to_multiple_of=shape.tp if sequence_parallel else None)

    # 5. The student: model, adapters, parallelism, exactly as finetune.
    model = load_model(cfg.model, seed=cfg.train.seed, dtype=precision.param_dtype)
    base_path = adapter_base(model, tokenizer, cfg, output_dir, env.is_main)
    model = prepare_model(model, cfg, precision=precision, mesh=mesh, shape=shape, registries=registries,
                          sequence_parallel=sequence_parallel)
    trainable, total = count_parameters(model)
    say(f"student: {cfg.model.path} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"{precision.describe()}, {shape.describe()})")

    # 6. The teacher: frozen, eval mode, no optimizer; sharded on the same mesh.
    teacher_dtype = torch_dtype(cfg.distill.teacher_dtype, env.device.type)
    teacher = load_model(teacher_cfg, seed=cfg.train.seed, dtype=teacher_dtype)
    teacher.requires_grad_(False)
    teacher.to(precision.device)
    teacher.eval()
    if mesh is not None:
        teacher = parallelize_model(teacher, mesh, plan_registry=registries.parallel_plans, tp=shape.tp,
                                    sequence_parallel=sequence_parallel, mixed_precision=False)
        # No backward follows a teacher forward: free every gathered parameter right after use
        # (FSDP2 otherwise keeps the root's parameters gathered between forward and backward).
        if hasattr(teacher, "set_reshard_after_forward"):
            teacher.set_reshard_after_forward(True)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    kd_weight, temperature = float(cfg.distill.kd_weight), float(cfg.distill.temperature)
    say(f"teacher: {cfg.distill.teacher_path} ({teacher_params / 1e6:.2f}M parameters, frozen, "
        f"{str(teacher_dtype).replace('torch.', '')}); loss = {1 - kd_weight:g} * {cfg.loss.name} + "
        f"{kd_weight:g} * {temperature:g}^2 * {cfg.distill.kl} KL at temperature {temperature:g}")

    # 7. Step math, optimizer and schedule (after parallelizing: parameters are now DTensors).
    plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 8. Resume, then the run's files (rank 0 writes them). Checkpoints never hold the teacher.
    state = resume(cfg, output_dir, model=model, optimizer=optimizer, scheduler=scheduler, say=say,
                   is_main=env.is_main)
    start_step = int(state["step"])
    loggers = open_loggers(cfg, registries, output_dir, start_step, env.is_main)

    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k].to(precision.device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def forward(model_: Any, batch: dict[str, Any]) -> Any:
        with precision.autocast():
            return model_(**model_inputs(batch), use_cache=False).logits

    def teacher_forward(batch: dict[str, Any]) -> Any:
        with torch.no_grad():  # in the teacher's own dtype
            return teacher(**model_inputs(batch), use_cache=False).logits

    def kl_of(logits: Any, teacher_logits: Any, labels: Any, normaliser: Any, temperature_: float) -> Any:
        return kd_loss(logits, teacher_logits, labels, normaliser, temperature=temperature_,
                       direction=cfg.distill.kl, vocab_size=vocab_size)

    fusion: dict[str, bool] = {}  # whether the first micro-batch could fuse the heads (said once)

    def fused_step(batch: dict[str, Any], labels: Any, label_tokens: int) -> tuple[Any, Any, Any] | None:
        """CE and KL from the student's hidden states and LM head, chunk by chunk (a fused
        ``loss.name`` such as linear_ce); None when the heads cannot be fused."""
        terms = distillation_training_loss(model, teacher, model_inputs(batch), labels, label_tokens, loss_spec,
                                           precision.autocast, kd_weight=kd_weight, temperature=temperature,
                                           direction=cfg.distill.kl, vocab_size=vocab_size)
        fusion.setdefault("fused", terms is not None)
        return terms

    def fusion_note() -> str | None:
        if loss_spec.distillation is None or "fused" not in fusion:
            return None
        if fusion["fused"]:
            return "fused head: CE and KL from the student's hidden states, chunk by chunk (no full logits)"
        reason = fusable_head(model)[1] or fusable_head(teacher)[1] or "unknown reason"
        return f"full logits for {cfg.loss.name}: the LM heads cannot be fused ({reason})"

    def full_logits_step(batch: dict[str, Any], labels: Any, label_tokens: int) -> tuple[Any, Any, Any]:
        logits = forward(model, batch)
        teacher_logits = teacher_forward(batch)
        with torch.set_grad_enabled(kd_weight < 1):  # a term of weight 0 needs no graph
            ce = loss_spec.logits_fn(logits, labels, label_tokens)
        with torch.set_grad_enabled(kd_weight > 0):
            kl = kl_of(logits, teacher_logits, labels, label_tokens, temperature)
        return distillation_loss(ce, kl, kd_weight=kd_weight, temperature=temperature), ce, kl

    def eval_batches() -> Any:
        return data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches)

    def evaluate_now() -> dict[str, float] | None:
        """The student's validation metrics plus ``eval_kl``: its KL to the teacher (``distill.kl``
        direction, temperature 1) per trained token. Every rank evaluates the same batches."""
        if not data.eval:
            return None
        totals = {"kl": 0.0, "tokens": 0}

        def forward_and_compare(model_: Any, batch: dict[str, Any]) -> Any:
            logits = forward(model_, batch)
            labels = batch["labels"].to(precision.device)
            totals["kl"] += kl_of(logits, teacher_forward(batch), labels, 1, 1.0).item()
            totals["tokens"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
            return logits

        result = evaluate(model, eval_batches(), forward_and_compare)
        return {**result, "eval_kl": totals["kl"] / max(1, totals["tokens"])}

    before = teacher_eval = None
    if start_step == 0 and data.eval:
        teacher_eval = evaluate(teacher, eval_batches(), lambda _teacher, batch: teacher_forward(batch))
        say(f"teacher:         {format_eval(teacher_eval)}")
        before = evaluate_now()
        say(f"before training: {_format_distill_eval(before)}")

    # 9. The training loop: one iteration per optimizer step.
    say(f"training {total_steps - start_step} steps of {cfg.train.global_batch_size} "
        f"{'packs' if cfg.data.packing else 'samples'} ({accumulation} micro-batches of "
        f"{cfg.train.micro_batch_size} on each of {dp_size} data-parallel rank(s)) -> {output_dir}")
    step, after = start_step, None
    stopping = False  # set once per step by checkpoint_due, agreed by every rank
    with GracefulStop() as stop, TrainingProgress(total_steps, start_step,
                                                  cfg.logging.progress and env.is_main) as progress:
        while step < total_steps and not stopping:
            started = time.perf_counter()
            samples = plan.samples(step)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            label_tokens = sum(data.train_label_tokens[i] for i in samples)
            sums = torch.zeros(3, device=precision.device)  # loss, CE and KL of this rank's share
            for group in groups[dp_index::dp_size]:  # this rank's share of the step
                batch = data.collate([data.train[i] for i in group])
                labels = batch["labels"].to(precision.device)
                loss, ce, kl = fused_step(batch, labels, label_tokens) or full_logits_step(batch, labels, label_tokens)
                loss.backward()
                sums += torch.stack([loss.detach(), ce.detach(), kl.detach()]).float()
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg.train.max_grad_norm)
            step += 1

            elapsed = time.perf_counter() - started
            tokens = sum(data.train_lengths[i] for i in samples)
            loss_value, ce_value, kl_value = meshes.all_reduce_dp(sums, mesh).tolist()
            metrics = {"step": step, "loss": loss_value, "ce_loss": ce_value, "kl": kl_value, "lr": lr,
                       "grad_norm": grad_norm, "tokens": tokens, "label_tokens": label_tokens,
                       **step_rates(tokens, elapsed, env.world_size),
                       "epoch": plan.epoch_of(step - 1)}
            if step == start_step + 1 and (note := fusion_note()):
                say(note)
            after = log_step(cfg, step, total_steps, metrics, evaluate=evaluate_now, describe=_format_distill_eval,
                             loggers=loggers, progress=progress) or after
            save_now, stopping = checkpoint_due(cfg, step, total_steps, stop, env)
            if save_now:
                save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"step": step}, keep=cfg.checkpoint.keep, tokenizer=tokenizer)

    if (code := close_loop(loggers, stop, step, total_steps, output_dir, say)) is not None:
        return code  # stopped by a signal: the checkpoint above lets it resume

    # 10. Save the student as Hugging Face outputs (gathered from every rank, written by rank 0).
    if after:
        say(f"after training:  {_format_distill_eval(after)}")
    save_outputs(model, tokenizer, cfg, env, output_dir, say, base_path=base_path,
                 summary={"steps": step, "teacher": cfg.distill.teacher_path, "teacher_eval": teacher_eval,
                          "before": before, "after": after})
    return 0


def _format_distill_eval(result: dict[str, float]) -> str:
    from automodel_cli.components.training.evaluation import format_eval

    return f"{format_eval(result)}, KL to teacher {result['eval_kl']:.4f}"


# --------------------------------------------------------------------------- checks

def _is_demo_student(cfg: Any) -> bool:
    from automodel_cli.assets import demo_dir

    return bool(cfg.model.path) and Path(cfg.model.path).resolve() == demo_dir() and cfg.model.from_scratch


def use_demo_teacher(cfg: Any) -> Path | None:
    """For the demo student without a teacher, ``distill.teacher_path`` becomes the cached demo
    teacher (``automodel finetune demo``, trained on first use by ``provide_demo_teacher``), so
    ``automodel distill demo`` runs by itself; returns its cache entry, else None."""
    from automodel_cli.components.training import demo_teacher
    from automodel_cli.config.yaml_io import Source

    if cfg.distill.teacher_path or not _is_demo_student(cfg):
        return None
    entry = demo_teacher.cache_entry()
    cfg.tree["distill"]["teacher_path"] = str(demo_teacher.model_dir(entry))
    cfg.sources["distill.teacher_path"] = Source("the cached demo teacher")
    return entry


def provide_demo_teacher(entry: Path, env: Any, say: Any) -> None:
    """Train the demo teacher unless it is cached: once per machine (the first process of each
    node; the others wait here)."""
    from automodel_cli.components.training import demo_teacher
    from automodel_cli.components.training.loop import barrier

    if env.local_rank == 0:
        demo_teacher.ensure_teacher(entry, say)
    barrier(env)


def check_distill_settings(cfg: Any) -> None:
    """A teacher is given (the schema checks types, choices and ranges)."""
    settings = cfg.distill
    if not settings.teacher_path:
        raise UserError(
            "automodel distill needs a teacher model, and distill.teacher_path is not set.",
            "Set distill.teacher_path to a Hugging Face model directory or hub id that uses the "
            "student's tokenizer (a finetune run's model is RUN_DIR/final). `automodel distill demo` "
            "brings its own teacher.",
        )


def check_same_distillation(cfg: Any, output_dir: Path) -> None:
    """A resumed run must keep its teacher and KD settings (finetune's keys are checked by
    ``prepare_output_dir``)."""
    from automodel_cli.config.schema import get_dotted
    from automodel_cli.config.yaml_io import load_yaml_file

    saved_path = output_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved, _ = load_yaml_file(saved_path)
    differences = [f"{key}: saved {get_dotted(saved, key)!r}, now {cfg.get(key)!r}"
                   for key in TEACHER_IDENTITY_KEYS if get_dotted(saved, key) != cfg.get(key)]
    if differences:
        raise UserError(
            f"output_dir `{output_dir}` holds a different run, so it cannot be resumed with these "
            f"settings ({'; '.join(differences)}).",
            "Resume with the original settings, or start a new run in another --output-dir.",
        )


def teacher_model_config(cfg: Any) -> Any:
    """The teacher as a ``model`` section for ``load_model``, checked here (directory, config,
    custom code, weight files, or the hub for a hub id) so that errors name
    ``distill.teacher_path`` and come before any data or model is loaded."""
    from automodel_cli.components.models.loading import check_model_source

    teacher_cfg = SimpleNamespace(
        path=cfg.distill.teacher_path, revision=cfg.distill.teacher_revision, from_scratch=False, config={},
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        tokenizer=cfg.distill.teacher_tokenizer, chat_template=None, role=TEACHER,
    )
    check_model_source(teacher_cfg, weights=True)
    return teacher_cfg


def _teacher_tokenizer(teacher_cfg: Any) -> Any:
    """The teacher's tokenizer: ``distill.teacher_tokenizer`` (must load), else whatever
    ``distill.teacher_path`` holds (None when it has no tokenizer)."""
    from transformers import AutoTokenizer

    from automodel_cli.components.models.loading import looks_like_local_path, source_access

    explicit = teacher_cfg.tokenizer is not None
    source = teacher_cfg.tokenizer if explicit else teacher_cfg.path
    revision = None if explicit else teacher_cfg.revision
    if looks_like_local_path(source):
        source = str(Path(source).expanduser())
    key = teacher_cfg.role.tokenizer_key if explicit else teacher_cfg.role.path_key
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=teacher_cfg.trust_remote_code,
                                             revision=revision, **source_access(source, revision, key))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if not explicit:
            return None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"Could not load the teacher tokenizer `{source}` ({first_line}) "
                        f"(distill.teacher_tokenizer).",
                        "Point it at a tokenizer directory or hub id, or leave it unset.") from None


def _vocab_size(config: Any) -> int:
    from automodel_cli.components.models.structure import text_config

    text = text_config(config)
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size"))


def check_vocabularies(student_config: Any, tokenizer: Any, teacher_cfg: Any, say: Any) -> int:
    """Teacher and student must score the same tokens: the same tokenizer vocabulary (when the
    teacher has a tokenizer) and the same number of logits, or a different number only when the
    tokenizers are verified identical and both cover them (embeddings padded to different sizes,
    e.g. Qwen2.5 7B vs 0.5B). Returns the number of logits to compare."""
    from automodel_cli.components.models.loading import load_config

    teacher_config = load_config(teacher_cfg)  # its errors name distill.teacher_path
    student_vocab, teacher_vocab = _vocab_size(student_config), _vocab_size(teacher_config)
    teacher_tokenizer = _teacher_tokenizer(teacher_cfg)
    if teacher_tokenizer is not None:
        student_ids, teacher_ids = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_ids != teacher_ids:
            examples = [f"`{token}` is {teacher_ids.get(token, 'missing')} for the teacher and "
                        f"{student_ids.get(token, 'missing')} for the student"
                        for token in sorted(set(student_ids) | set(teacher_ids), key=lambda t: (
                            min(student_ids.get(t, 1 << 62), teacher_ids.get(t, 1 << 62)), t))
                        if student_ids.get(token) != teacher_ids.get(token)][:2]
            raise UserError(
                f"The teacher and the student use different vocabularies: the teacher's tokenizer has "
                f"{len(teacher_tokenizer)} tokens (model vocab_size {teacher_vocab}) and the student's "
                f"{len(tokenizer)} (model vocab_size {student_vocab}), and token ids differ "
                f"({'; '.join(examples)}), so their next-token distributions cannot be compared.",
                "Distil between models that share a tokenizer (one model family, e.g. Qwen2.5-7B -> "
                "Qwen2.5-0.5B), or choose a teacher or student with the other's tokenizer.",
            )
    if student_vocab == teacher_vocab:
        return student_vocab
    common = min(student_vocab, teacher_vocab)
    if teacher_tokenizer is not None and len(tokenizer) <= common:
        say(f"note: teacher and student share a tokenizer of {len(tokenizer)} tokens but have "
            f"{teacher_vocab} and {student_vocab} logits (padded embeddings); the KL compares the "
            f"first {common}.")
        return common
    raise UserError(
        f"The teacher and the student have different vocabularies: the teacher's model has "
        f"vocab_size {teacher_vocab} and the student's {student_vocab}, so their next-token "
        f"distributions cannot be compared token by token.",
        "Distil between models that share a tokenizer (one model family); if they do and only pad "
        "their embeddings differently, set distill.teacher_tokenizer to the teacher's tokenizer so it "
        "can be checked.",
    )
