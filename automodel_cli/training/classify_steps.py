"""The step and the validation of ``automodel classify``, and the checks they rely on.

A step's samples (pairs, for a reward model) are cut into micro-batches of similar length; each
data-parallel rank takes its share, and every loss and metric of a micro-batch is a sum over its
samples divided by the step's sample count over all ranks, so the all-reduced values are the
step's means. Macro F1 needs the step's per-class counts: they are all-reduced over the
data-parallel ranks inside the step (every rank runs it in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automodel_cli.errors import UserError


def check_layout(cfg: Any) -> None:
    """Refuse, before anything is read or written, what the pooled head cannot run with:
    sequence parallelism (the head reads each sequence's last real token, and sequence
    parallelism leaves every rank a slice of the sequence; plain tensor parallelism is fine: the
    decoder's output is whole on every rank and the small score head is replicated) and packed
    sequences (one pooled token per row). Pipeline and context parallelism are refused by the
    training run (they are only for recipes that support them)."""
    if cfg.distributed.tp > 1 and cfg.distributed.sequence_parallel:
        raise UserError(
            "distributed.sequence_parallel=true is not supported by `automodel classify`: its score head reads "
            "each sequence's last real token, and sequence parallelism splits the sequence over the ranks.",
            "Set distributed.sequence_parallel=false (tensor parallelism itself works), or use FSDP2 "
            "(distributed.dp_shard).")
    if cfg.data.packing:
        raise UserError("data.packing=true does not apply to `automodel classify`: each sequence is classified "
                        "from its own last token, so sequences cannot share a row.", "Set data.packing=false.")


def set_pad_token(tokenizer: Any, cfg: Any, say: Callable[[str], None]) -> Any:
    """Give ``tokenizer`` the pad token ``classify.pad_token`` names (``eos``, or a token of its
    vocabulary), keep its own otherwise, and pad on the right. A tokenizer with no pad token is a
    ``UserError``: the model finds the token it classifies as the last one that is not padding.

    With EOS as padding, transformers cannot tell a real trailing EOS from padding: the head then
    reads the last token before the trailing EOS tokens, in training and after ``from_pretrained``
    alike (the same rule on the same ids), so the two agree; said once."""
    text = getattr(tokenizer, "tokenizer", tokenizer)
    choice = cfg.classify.pad_token
    if choice == "eos":
        if text.eos_token is None:
            raise UserError(f"classify.pad_token=eos, but the tokenizer of `{cfg.model.path}` has no EOS token.",
                            "Set classify.pad_token to a token of its vocabulary.")
        text.pad_token = text.eos_token
    elif choice:
        token_id = text.convert_tokens_to_ids(choice)
        if token_id is None or (token_id == text.unk_token_id and choice != text.unk_token):
            raise UserError(f"classify.pad_token=`{choice}` is not a token of the vocabulary of `{cfg.model.path}`.",
                            "Name a token the tokenizer has (one it never produces from text is best), or use eos.")
        text.pad_token = choice
    if text.pad_token_id is None:
        raise UserError(
            f"The tokenizer of `{cfg.model.tokenizer or cfg.model.path}` has no pad token: a sequence classifier "
            "classifies the last token that is not padding, which it finds with the pad token's id "
            "(config.pad_token_id).",
            "Set classify.pad_token=eos to pad with the EOS token (trailing EOS tokens then count as padding), "
            "or classify.pad_token=TOKEN with a token of the vocabulary the data does not contain.")
    text.padding_side = "right"
    if text.pad_token_id == text.eos_token_id:
        say(f"note: the pad token is the EOS token `{text.eos_token}`: the head reads each sequence's last token "
            "that is not EOS (a trailing EOS counts as padding)")
    return tokenizer


def _scores(run: Any, model: Any, batch: dict[str, Any]) -> Any:
    """The head's output for a collated batch (float32): ``[rows, num_labels]``."""
    device = run.precision.device
    with run.precision.autocast():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float()


def batch_terms(scores: Any, batch: dict[str, Any], reward: bool, num_labels: int) -> dict[str, Any]:
    """Sums over a batch's samples: ``loss``, ``correct``, ``margin`` (reward) and the class
    counts (classes). A reward batch holds its chosen rows, then its rejected rows."""
    import torch.nn.functional as F

    from automodel_cli.components.training.classification import bradley_terry_loss, class_counts

    if reward:
        rewards = scores[:, 0]
        chosen, rejected = rewards.chunk(2)
        return {"loss": bradley_terry_loss(chosen, rejected).sum(), "correct": (chosen > rejected).sum(),
                "margin": (chosen - rejected).sum()}
    labels = batch["labels"].to(scores.device)
    predicted = scores.argmax(-1)
    return {"loss": F.cross_entropy(scores, labels, reduction="sum"), "correct": (predicted == labels).sum(),
            "counts": class_counts(predicted, labels, num_labels)}


def classify_step(run: Any, model: Any, data: Any, plan: Any) -> Callable[[int], Any]:
    """The step function for ``TrainingRun.train``: ``loss``, ``accuracy`` and (reward)
    ``margin`` as the step's means; macro ``f1`` of the step's predictions (classes)."""
    import torch

    from automodel_cli.components.distributed import mesh as meshes
    from automodel_cli.components.training import steps as step_math
    from automodel_cli.components.training.classification import macro_f1
    from automodel_cli.training.classify_data import REWARD
    from automodel_cli.training.run import StepOutput

    reward, device = data.task == REWARD, run.precision.device

    def step(index: int) -> StepOutput:
        samples = plan.samples(index)
        groups = step_math.micro_batches(samples, data.train_lengths, run.cfg.train.micro_batch_size)
        count = len(samples)
        sums = torch.zeros(3, device=device)  # loss, accuracy, margin: this rank's share of the step's means
        counts = torch.zeros((len(data.labels), 3), dtype=torch.float64, device=device)
        for group in groups[run.dp_index::run.dp_size]:
            batch = data.collate([data.train[i] for i in group])
            terms = batch_terms(_scores(run, model, batch), batch, reward, len(data.labels))
            (terms["loss"] / count).backward()
            sums += torch.stack([terms["loss"].detach(), terms["correct"].float(),
                                 terms.get("margin", torch.zeros((), device=device)).detach()]) / count
            if not reward:
                counts += terms["counts"]
        named = {"loss": sums[0], "accuracy": sums[1], **({"margin": sums[2]} if reward else {})}
        metrics: dict[str, Any] = {"epoch": plan.epoch_of(index)}
        if not reward:
            metrics["f1"] = macro_f1(meshes.all_reduce_dp(counts, run.mesh).cpu())
        return StepOutput(named, tokens=sum(data.train_lengths[i] for i in samples), metrics=metrics)

    return step


def classify_validation(run: Any, model: Any, data: Any) -> Callable[[], dict[str, float] | None]:
    """Validation for ``TrainingRun.train``: ``eval_loss`` and ``eval_accuracy``, then ``eval_f1``
    (classes) or ``eval_margin`` (reward), over the validation samples (``train.eval_batches``
    batches of 4 micro-batches' size at most); None without validation data. Every rank
    evaluates the same batches (sharded forwards are collective)."""

    def validate() -> dict[str, float] | None:
        if not data.eval:
            return None
        cfg = run.cfg
        batches = data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches)
        result = score_batches(model, batches, lambda batch: _scores(run, model, batch), data)
        return {f"eval_{name}": value for name, value in result.items()}

    return validate


def score_batches(model: Any, batches: Any, scores: Callable[[dict[str, Any]], Any], data: Any) -> dict[str, float]:
    """``loss`` and ``accuracy``, then ``f1`` (classes: macro F1) or ``margin`` (reward), means
    over the samples of ``batches`` (collated by ``data``), and ``samples``; ``scores(batch)`` is
    the head's float32 output. Without gradients, the model in eval mode meanwhile. Shared by
    validation and ``automodel evaluate``, so both compute the same numbers."""
    import torch

    from automodel_cli.components.training.classification import macro_f1
    from automodel_cli.training.classify_data import REWARD

    reward = data.task == REWARD
    totals = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "samples": 0}
    counts = torch.zeros((len(data.labels), 3), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            terms = batch_terms(scores(batch), batch, reward, len(data.labels))
            for key in ("loss", "correct", "margin"):
                totals[key] += float(terms.get(key, 0.0))
            totals["samples"] += batch["input_ids"].shape[0] // (2 if reward else 1)
            if not reward:
                counts += terms["counts"].cpu()
    if was_training:
        model.train()
    n = max(1, totals["samples"])
    result = {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n, "samples": totals["samples"]}
    if reward:
        result["margin"] = totals["margin"] / n
    else:
        result["f1"] = macro_f1(counts)
    return result
