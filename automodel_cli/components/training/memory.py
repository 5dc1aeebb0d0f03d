"""Memory savers applied to the model before training."""

from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute every decoder layer in backward instead of keeping its activations.

    Non-reentrant checkpointing works with frozen inputs (LoRA) without the
    ``enable_input_require_grads`` hook the reentrant variant needs. transformers 5.2x renamed
    the method; both spellings are supported.
    """
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
