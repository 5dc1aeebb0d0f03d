"""``automodel dpo``: preference training (DPO, IPO, hinge, SimPO, ORPO) of a causal LM.

The policy is trained exactly as ``automodel finetune`` trains a model (same config, LoRA/DoRA,
FSDP2/TP, checkpoints, kill -9 resume, loggers, outputs); what changes is the data -- pairs of a
chosen and a rejected response to one prompt (``training/preference_data.py``) -- and the loss
(``components/loss/preference.py``, formulas there and in docs/dpo.md). Each micro-batch of
``k`` pairs is one concatenated forward of ``2k`` sequences (packed when ``data.packing``); only
response tokens are scored, summed per sequence.

The reference (``training/reference.py``) is a frozen copy of the starting model (or
``dpo.reference_path``), or with LoRA the policy with its adapter disabled; reference-free
losses (simpo, orpo) load none, nor does data whose rows carry the reference log-probabilities
(``ref_chosen_logps``/``ref_rejected_logps``), and ``dpo.precompute_reference`` computes its
log-probabilities once before training and frees it.

Pairs are the unit: one optimizer step takes ``train.global_batch_size`` pairs whatever the
number of processes, each rank sums its pairs' losses and divides by the step's pair count over
all ranks (orpo's NLL term by the step's chosen tokens), so 1 and N processes agree. Every step
logs ``loss`` and TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``; validation the same with ``eval_``
and ``eval_preference_accuracy`` (how often the policy gives the chosen response the higher
log-probability).
"""

from __future__ import annotations

from typing import Any

from automodel_cli.config.schema import option

RECIPE = "dpo"
#: The recipe's own config section, ``dpo`` (read by this recipe only).
CONFIG = {"dpo": {
    "loss": option(str, "sigmoid", "Preference loss: sigmoid (DPO), ipo, hinge, simpo (reference-free, length-normalised), "
                   "orpo (reference-free, odds ratio + NLL); formulas in docs/dpo.md.",
                   choices=("sigmoid", "ipo", "hinge", "simpo", "orpo")),
    "beta": option((int, float), 0.1, "β: strength of the preference (sigmoid, ipo, hinge: deviation from the reference; "
                   "simpo: reward scale).", gt=0),
    "label_smoothing": option((int, float), 0.0, "ε of conservative DPO (sigmoid) and SimPO: the probability that a "
                              "preference label is wrong.", ge=0, lt=0.5),
    "simpo_gamma": option((int, float), 0.5, "γ of simpo: the target reward margin.", ge=0),
    "orpo_alpha": option((int, float), 0.1, "λ of orpo: weight of the odds-ratio term next to the NLL of the chosen "
                         "responses (TRL's ORPOConfig.beta).", gt=0),
    "reference_path": option((str, type(None)), None, "Reference model (hub id or local directory) for sigmoid/ipo/hinge; "
                             "default: the policy's starting weights (with LoRA, the base with the adapter disabled)."),
    "precompute_reference": option(bool, False, "Compute the reference log-probabilities of every pair once before "
                                   "training, then free the reference model."),
    "chosen_column": option(str, "chosen", "Column of the chosen (preferred) response."),
    "rejected_column": option(str, "rejected", "Column of the rejected response."),
    "drop_identical_pairs": option(bool, False, "Drop pairs whose chosen equals the rejected response with a warning "
                                   "(default: refuse the data, naming the rows)."),
}}
#: Settings a resumed preference run must share with the run it continues (besides finetune's).
IDENTITY_KEYS = ("dpo.loss", "dpo.beta", "dpo.label_smoothing", "dpo.simpo_gamma", "dpo.orpo_alpha",
                 "dpo.reference_path")
#: Metrics every step logs, in this order (``loss`` first), as TRL names them.
STEP_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def run(context: Any) -> int:
    import torch

    from automodel_cli.components.loss.preference import preference_losses
    from automodel_cli.components.moe.balance import router_terms
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.training import reference as references
    from automodel_cli.training.preference_data import model_inputs, prepare_preference_data
    from automodel_cli.training.run import StepOutput, TrainingRun

    # 1. The demo's SFT'd starting model, the settings a resume must keep; refusals before anything.
    cfg = context.config
    use_demo_policy(cfg, context.registries)
    check_settings(cfg)

    # 2. Processes, mesh, run directory, precision.
    with TrainingRun(context) as run:
        run.accumulation()  # global batch sizes that do not divide fail now
        settings = cfg.dpo

        # 3. Tokenizer and pairs (bad data fails before a model loads), the reference's source.
        tokenizer = load_text_tokenizer(cfg)
        data = prepare_preference_data(cfg, tokenizer, run.registries, run.say, pad_to_multiple_of=run.pad_multiple)
        reference_cfg = references.reference_model_config(cfg)

        # 4. The policy, exactly as finetune; the reference (a frozen copy, the adapter-less base or none).
        model = run.load_model(tokenizer)
        run.describe_model(model, "policy")
        needs_model = references.reference_kind(cfg) != "none" and not data.reference_from_data
        reference = references.Reference(run, model, reference_cfg) if needs_model else None
        run.say(describe_loss(cfg, reference, data.reference_from_data))

        def on_device(batch: dict[str, Any]) -> tuple[Any, Any]:
            return batch["labels"].to(run.precision.device), batch["sequence_index"].to(run.precision.device)

        def policy_logps(batch: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, Any]:
            """The policy's per-sequence response log-probabilities and token counts (``2k``: chosen first)."""
            return references.response_logps(model, inputs, *on_device(batch), 2 * batch["pairs"],
                                             run.precision.autocast)

        def reference_logps(batch: dict[str, Any], inputs: dict[str, Any]) -> Any:
            if "reference" in batch:
                return batch["reference"].to(run.precision.device)
            if reference is None:
                return None
            return reference.logps(inputs, *on_device(batch), 2 * batch["pairs"], run.precision.autocast)

        def pair_terms(batch: dict[str, Any], ref: Any, logps: Any, tokens: Any) -> Any:
            """Per-pair losses and rewards from the policy's and the reference's (or None) log-probs."""
            k = batch["pairs"]
            return preference_losses(
                settings.loss, chosen_logps=logps[:k], rejected_logps=logps[k:], chosen_tokens=tokens[:k],
                rejected_tokens=tokens[k:], ref_chosen_logps=None if ref is None else ref[:k],
                ref_rejected_logps=None if ref is None else ref[k:], beta=float(settings.beta),
                label_smoothing=float(settings.label_smoothing), simpo_gamma=float(settings.simpo_gamma),
                orpo_alpha=float(settings.orpo_alpha))

        def metric_sums(terms: Any, logps: Any, k: int) -> list[Any]:
            chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
            return [chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).float().sum(),
                    logps[:k].detach().sum(), logps[k:].detach().sum()]

        # 5. Steps, optimizer and schedule; the reference's log-probs once (then it is freed); resume.
        plan = step_math.StepPlan(len(data.train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        total_steps = step_math.total_steps(plan, cfg.train.max_steps, cfg.train.epochs)
        run.build_optimizer(total_steps)
        if settings.precompute_reference and reference is not None:
            precompute(data, reference, reference_logps, run)
            if reference.kind == "copy":
                reference.free()
        run.resume()
        orpo = settings.loss == "orpo"
        names = STEP_METRICS + (("nll_loss",) if orpo else ())

        def step(index: int) -> StepOutput:
            """One optimizer step on this rank's micro-batches of the step's pairs."""
            samples = plan.samples(index)
            groups = step_math.micro_batches(samples, data.train_lengths, cfg.train.micro_batch_size)
            pairs = len(samples)
            chosen_tokens = sum(data.train_chosen_tokens[i] for i in samples)
            sums = torch.zeros(len(names), device=run.precision.device)
            for group in groups[run.dp_index::run.dp_size]:
                batch = data.collate([data.train[i] for i in group])
                inputs = model_inputs(batch, run.precision.device)
                ref = reference_logps(batch, inputs)  # outside: a router's balance loss is the policy's only
                with router_terms(model, inputs, batch["labels"].to(run.precision.device)) as with_router_terms:
                    logps, tokens = policy_logps(batch, inputs)
                    terms = pair_terms(batch, ref, logps, tokens)
                    loss = terms.losses.sum() / pairs
                    nll = -logps[:batch["pairs"]].sum() / chosen_tokens if orpo else None
                    loss = with_router_terms(loss + nll if orpo else loss)
                loss.backward()
                values = [loss.detach(), *(v / pairs for v in metric_sums(terms, logps, batch["pairs"]))]
                sums += torch.stack(values + ([nll.detach()] if orpo else [])).float()
            return StepOutput(dict(zip(names, sums)), tokens=sum(data.train_lengths[i] for i in samples),
                              metrics={"pairs": pairs, "epoch": plan.epoch_of(index)})

        def validate() -> dict[str, float] | None:
            """Mean loss and rewards over the validation pairs, and how often the policy gives the
            chosen response the higher log-probability. Every rank evaluates the same batches."""
            if not data.eval:
                return None
            was_training = model.training
            model.eval()
            totals = torch.zeros(len(STEP_METRICS) + 2, dtype=torch.float64)  # the metrics, prefers chosen, pairs
            with torch.no_grad():
                for batch in data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches):
                    inputs = model_inputs(batch, run.precision.device)
                    logps, tokens = policy_logps(batch, inputs)
                    terms = pair_terms(batch, reference_logps(batch, inputs), logps, tokens)
                    k = batch["pairs"]
                    loss = terms.losses.sum()
                    if orpo:  # the batch's token-mean NLL, once per pair
                        loss = loss - logps[:k].sum() / tokens[:k].sum().clamp(min=1) * k
                    values = [loss, *metric_sums(terms, logps, k), (logps[:k] > logps[k:]).sum(), k]
                    totals += torch.tensor([float(v) for v in values], dtype=torch.float64)
            if was_training:
                model.train()
            pairs = totals[-1].item()
            result = {f"eval_{name}": (totals[i] / pairs).item() for i, name in enumerate(STEP_METRICS)}
            result["eval_preference_accuracy"] = (totals[-2] / pairs).item()
            result["eval_pairs"] = int(pairs)
            return result

        # 6. Train, validating before, during and after.
        before = run.validate_before(validate, format_preference_eval)
        run.announce(total_steps, "pairs", ", packed" if cfg.data.packing else "")
        result = run.train(step, total_steps=total_steps, evaluate=validate, describe=format_preference_eval,
                           tokenizer=tokenizer)
        if result.stopped:
            return result.exit_code  # a signal stopped it after a checkpoint: resume continues

        # 7. The policy as Hugging Face outputs (gathered from every rank, written by rank 0).
        reference_source = reference.describe() if reference else ("data" if data.reference_from_data else None)
        return run.finish(tokenizer, summary={"steps": result.step, "loss": settings.loss,
                                              "reference": reference_source,
                                              "before": before, "after": result.after})


def use_demo_policy(cfg: Any, registries: Any) -> None:
    """``automodel dpo demo`` starts from the finetune demo's trained model (cached once per
    machine, as the distill demo's teacher: ``training/demo_teacher.py``), trained now if needed
    (every process may call this: a lock makes one train it)."""
    import os

    from automodel_cli.config.yaml_io import Source
    from automodel_cli.training import demo_teacher
    from automodel_cli.training.teacher import is_demo_model

    if not is_demo_model(cfg):
        return
    entry = demo_teacher.cache_entry(registries)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda _line: None)
    demo_teacher.ensure_teacher(entry, lambda line: say(line.replace("demo teacher", "demo SFT model"), flush=True))
    cfg.tree["model"]["path"] = str(demo_teacher.model_dir(entry))
    cfg.tree["model"]["from_scratch"] = False
    cfg.sources["model.path"] = Source("the cached `automodel finetune demo` model")


def check_settings(cfg: Any) -> None:
    """What preference training cannot run is refused before anything loads; a resumed run keeps
    its loss and reference."""
    from pathlib import Path

    from automodel_cli.components.loss.preference import REFERENCE_FREE
    from automodel_cli.components.models.loading import load_config
    from automodel_cli.components.models.vlm import is_vision_language
    from automodel_cli.errors import UserError
    from automodel_cli.training.teacher import check_same_distillation

    if cfg.dpo.reference_path and cfg.dpo.loss in REFERENCE_FREE:
        raise UserError(f"dpo.loss={cfg.dpo.loss} is reference-free, but dpo.reference_path is set.",
                        "Remove dpo.reference_path, or choose dpo.loss=sigmoid, ipo or hinge.")
    if cfg.model.path and is_vision_language(load_config(cfg.model)):
        raise UserError(f"automodel dpo trains text-only causal LMs; {cfg.model.path} is a vision-language model.",
                        "Use a text-only model, or `automodel finetune` for vision-language fine-tuning.")
    if cfg.output_dir and cfg.checkpoint.resume not in (None, False, "off", "none", ""):
        check_same_distillation(cfg, Path(cfg.output_dir), IDENTITY_KEYS)


def load_text_tokenizer(cfg: Any) -> Any:
    from automodel_cli.components.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        from automodel_cli.errors import UserError

        raise UserError(f"The tokenizer of {cfg.model.path} has neither a pad nor an end-of-sequence token.",
                        "Set model.tokenizer to a tokenizer that has one.")
    return tokenizer


def precompute(data: Any, reference: Any, reference_logps: Any, run: Any) -> None:
    """The reference's log-probabilities of every training and validation pair, stored with the
    pairs (every rank computes all of them: the sharded reference's forwards are collective)."""
    import time

    from automodel_cli.training.preference_data import model_inputs

    started = time.perf_counter()
    size = run.cfg.train.micro_batch_size
    for pairs in (data.train, data.eval):
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            batch = data.eval_collate(chunk)
            logps = reference_logps(batch, model_inputs(batch, run.precision.device)).cpu().tolist()
            for i, pair in enumerate(chunk):
                pair["reference"] = (logps[i], logps[len(chunk) + i])
    run.say(f"reference: log-probabilities of {len(data.train) + len(data.eval)} pairs precomputed in "
            f"{time.perf_counter() - started:.1f} s" + ("; the reference model is freed" if reference.kind == "copy" else ""))


def describe_loss(cfg: Any, reference: Any, from_data: bool = False) -> str:
    settings = cfg.dpo
    detail = {"sigmoid": f"beta {settings.beta:g}" + (f", label smoothing {settings.label_smoothing:g}"
                                                     if settings.label_smoothing else ""),
              "ipo": f"beta {settings.beta:g}", "hinge": f"beta {settings.beta:g}",
              "simpo": f"beta {settings.beta:g}, gamma {settings.simpo_gamma:g}",
              "orpo": f"alpha {settings.orpo_alpha:g}"}[settings.loss]
    if reference is not None:
        source = f"reference: {reference.describe()}"
    elif from_data:  # the data's columns are used only by the losses that need a reference
        source = "reference: log-probabilities from the data's ref_chosen_logps/ref_rejected_logps (no model loaded)"
    else:
        source = "no reference model (reference-free)"
    return f"preference loss: {settings.loss} ({detail}); {source}"


def format_preference_eval(result: dict[str, float]) -> str:
    return (f"eval loss {result['eval_loss']:.4f}, reward accuracy {result['eval_rewards/accuracies']:.1%}, "
            f"margin {result['eval_rewards/margins']:.4f} ({result['eval_pairs']} pairs)")
