"""Per-decoder-layer memory and speed options: activation checkpointing and torch.compile.

Activation checkpointing (``train.activation_checkpointing``) trades compute for memory:

* ``none`` (``false``): every activation the backward pass needs is kept.
* ``full`` (``true``): every decoder layer keeps only its input and is recomputed in backward
  (about one extra forward pass: the classic ~30% slower step for the smallest activation memory).
* ``selective``: every other decoder layer is checkpointed (layers 0, 2, 4, ...): about half the
  activation memory saved for about half the recompute. Layer-level rather than op-level
  selection because it is exact, architecture-independent and composes with FSDP2 and
  ``train.compile`` without per-op policies. docs/performance.md has measured numbers.

Checkpointing uses Hugging Face's own switch when the model has one (parameter names, and so
checkpoints, are unchanged), non-reentrant (works with frozen LoRA bases without the
``enable_input_require_grads`` hook the reentrant variant needs); otherwise torch's
``checkpoint_wrapper`` around the chosen layers.

``train.compile`` compiles each decoder layer separately (``module.compile()``), as torchtitan
does: every layer has the same code, so one compilation serves all of them and graph breaks
stay inside a layer, while the embedding, the LM head and the loss run eagerly. It is applied
after LoRA is attached (the adapters are part of the compiled layer) and before FSDP2 wraps the
layers.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.components.models.structure import decoder_layers, unwrap
from automodel_cli.errors import UserError, did_you_mean

MODES = ("none", "full", "selective")


def checkpointing_mode(value: Any) -> str:
    """``train.activation_checkpointing`` as one of ``none``, ``full``, ``selective`` (booleans,
    also written as text, are accepted: false = none, true = full). Always go through this
    function rather than testing the value's truth: a quoted ``"false"`` in YAML is truthy."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    text = str(value).strip().lower()
    if text in MODES:
        return text
    if text in ("false", "true"):  # quoted in a YAML file
        return "full" if text == "true" else "none"
    raise UserError(
        f"train.activation_checkpointing={value!r} is not an option.{did_you_mean(text, MODES)}",
        "Use none (or false), full (or true) or selective.",
    )


def enable_activation_checkpointing(model: Any, mode: Any = "full") -> str:
    """Checkpoint the decoder layers of ``model`` (a Hugging Face model or a peft wrapper)
    according to ``mode``; returns the normalised mode."""
    mode = checkpointing_mode(mode)
    if mode == "none":
        return mode
    every = 2 if mode == "selective" else 1
    options = {"use_reentrant": False}
    hf = unwrap(model)
    if getattr(hf, "supports_gradient_checkpointing", False):
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=options, every_n_layers=every)
            return mode
        if every == 1 and hasattr(hf, "gradient_checkpointing_enable"):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
            return mode
    _wrap_layers(model, every)
    return mode


def _wrap_layers(model: Any, every: int) -> None:
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing as wrap,
        checkpoint_wrapper,
    )

    chosen = {id(m) for i, m in enumerate(decoder_layers(model)) if i % every == 0}
    wrap(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
         check_fn=lambda m: id(m) in chosen)


def compile_decoder_layers(model: Any, backend: str = "inductor") -> int:
    """``torch.compile`` every decoder layer in place; returns how many were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
