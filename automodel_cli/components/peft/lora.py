"""LoRA and DoRA adapters, built with the peft library rather than by hand."""

from __future__ import annotations

from typing import Any


def apply_peft(model: Any, peft_cfg: Any) -> Any:
    """Wrap ``model`` with LoRA (or DoRA) adapters; returns the model unchanged for ``none``.

    ``target_modules="all-linear"`` adapts every linear layer of the decoder (peft leaves the
    output head out), which is what most recent LoRA recipes use. For a vision-language model it
    means the language model's linear layers only (``vlm.language_lora_targets``): the vision
    tower and projector get no adapters (and stay frozen, as peft freezes every base weight). An
    explicit list of names is passed to peft as given, and matches wherever those names occur.
    """
    if peft_cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    from automodel_cli.components.models.vlm import language_lora_targets

    target = peft_cfg.target_modules
    if target == "all-linear":
        target = language_lora_targets(model) or target
    config = LoraConfig(
        r=peft_cfg.rank,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=float(peft_cfg.dropout),
        target_modules=target if isinstance(target, str) else list(target),
        use_dora=peft_cfg.method == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
