"""LoRA and DoRA adapters, built with the peft library rather than by hand."""

from __future__ import annotations

from typing import Any


def apply_peft(model: Any, peft_cfg: Any) -> Any:
    """Wrap ``model`` with LoRA (or DoRA) adapters; returns the model unchanged for ``none``.

    ``target_modules="all-linear"`` adapts every linear layer of the decoder (peft leaves the
    output head out), which is what most recent LoRA recipes use.
    """
    if peft_cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    target = peft_cfg.target_modules
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
