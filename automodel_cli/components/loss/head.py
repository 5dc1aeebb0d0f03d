"""From a batch to a training loss, for every kind of registered loss.

The recipe calls one function, ``training_loss(model, inputs, labels, num_label_tokens,
loss_spec, autocast)``; what it computes depends on the loss's ``LossSpec`` (``spec.py``,
documented in docs/plugins.md under ``register_losses``):

``kind="fused"``
    the loss gets the final hidden states of the trained positions and the LM head's parameters
    and computes the logits itself (``linear_ce``: chunk by chunk, never all of them).
``kind="logits"``, ``rows=True``
    the LM head is applied to the trained positions only and the loss gets those rows' logits, so
    prompt and padding tokens cost no vocabulary projection at all (``masked_ce``, ``chunked_ce``;
    on the benchmark model +45% tokens/s for full fine-tuning and 150-200 MB less peak memory
    than full logits).
``kind="logits"``
    the model's full logits and HF-convention labels (the loss shifts them). Any loss written
    for the original contract, such as a plain function registered as a loss.

How the hidden states are reached: the whole model still runs its own ``forward`` (so FSDP2's
root hooks, which gather the embedding, final norm and head weights, and peft's wrapper behave
exactly as usual), but for the duration of the call the LM head's ``forward`` is replaced by a
probe. The probe receives the hidden states the model would project, computes the loss from
them, and returns it in place of the logits; ``training_loss`` checks that the model handed that
very tensor back (it must not have transformed the "logits" afterwards).

When the head cannot be fused the full logits are computed, exactly as before, and the loss runs
on them (a fused loss through its spec's ``logits_fallback``, default ``masked_ce``):

* models that change the logits after the head (Gemma 2's ``final_logit_softcapping``, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``): detected from the config, and as a safety net
  by the identity check above;
* a tensor-parallel LM head (its weight is a DTensor inside the forward; FSDP2 weights are plain
  tensors there, so FSDP runs fuse);
* an LM head that is not a plain ``nn.Linear`` (a LoRA-adapted or quantised head);
* hidden states whose shape does not match the labels.

Evaluation never goes through here: it always sees the model's full logits (and adds no
router balance loss).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from automodel_cli.components.loss.spec import LossSpec
from automodel_cli.components.loss.targets import IGNORE_INDEX
from automodel_cli.components.models import structure

#: Config attributes of models whose logits are changed after the LM head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def training_loss(
    model: Any,
    inputs: dict[str, Any],
    labels: Any,
    num_label_tokens: int | Any,
    loss_spec: LossSpec | Callable[..., Any],
    autocast: Callable[[], Any] | None = None,
    *,
    shifted: bool = False,
) -> Any:
    """The loss of one micro-batch, with its autograd graph (call ``.backward()`` on it).

    ``inputs`` are the model's keyword inputs already on the model's device (``input_ids`` and
    ``attention_mask`` or ``position_ids``); ``labels`` are the HF-convention ``[B, T]`` labels
    (any device), or with ``shifted=True`` ``[B, T]`` targets already shifted (position ``t``
    predicts ``labels[t]``: a context-parallel shard, whose last local token's target lies in
    another rank's part, is never shifted again); ``num_label_tokens`` the optimizer step's
    trained tokens (the normaliser);
    ``autocast`` a context-manager factory wrapped around the forward pass. ``loss_spec`` is the
    loss (``build_loss`` gives it with its options applied); a plain function is a logits loss.

    A mixture-of-experts model carrying a balance monitor (``components/moe/balance.py``) gets
    its router terms added: ``coef * aux (+ z_coef * z)``, each divided by the step's
    micro-batches over all data-parallel ranks; the monitor keeps their detached values.
    """
    from automodel_cli.components.moe import balance

    with balance.router_terms(model, inputs, labels) as with_router_terms:
        return with_router_terms(_training_loss(model, inputs, labels, num_label_tokens, LossSpec.of(loss_spec),
                                                autocast, shifted))


def _training_loss(model: Any, inputs: dict[str, Any], labels: Any, num_label_tokens: Any, spec: LossSpec,
                   autocast: Callable[[], Any] | None, shifted: bool = False) -> Any:
    autocast = autocast or contextlib.nullcontext
    head = fusable_head(model)[0] if spec.kind == "fused" or spec.rows else None
    if head is None:
        return _full_logits_loss(model, inputs, labels, num_label_tokens, spec, autocast, shifted)

    def compute(selected: Any, targets: Any, project: Callable[[Any], Any]) -> Any:
        if spec.kind == "fused":
            return spec.fn(selected, head.weight, targets, num_label_tokens, bias=head.bias)
        return spec.fn(project(selected), targets, num_label_tokens)

    value, output = _loss_inside_forward(model, head, inputs, labels, compute, autocast, shifted=shifted)
    if value is not None:
        return value
    if output is None:  # the model transformed its "logits": never fused again (see above)
        return _full_logits_loss(model, inputs, labels, num_label_tokens, spec, autocast, shifted)
    return _logits_loss(spec, output.logits, labels, num_label_tokens, shifted)


def _logits_loss(spec: LossSpec, logits: Any, labels: Any, num_label_tokens: Any, shifted: bool) -> Any:
    """``spec``'s logits loss; already-shifted targets go in the rows layout (``[N, V]`` logits
    with ``[N]`` targets), which every built-in loss takes as given."""
    labels = labels.to(logits.device)
    if shifted:
        return spec.logits_fn(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), num_label_tokens)
    return spec.logits_fn(logits, labels, num_label_tokens)


def distillation_training_loss(
    model: Any,
    teacher: Any,
    inputs: dict[str, Any],
    labels: Any,
    num_label_tokens: int | Any,
    loss_spec: LossSpec | Callable[..., Any],
    autocast: Callable[[], Any] | None = None,
    **options: Any,
) -> tuple[Any, Any, Any] | None:
    """``(loss, ce, kl)`` of one distillation micro-batch without the student's full logits, or
    None when it cannot be fused: the CE loss's spec has no ``distillation`` function
    (``linear_ce``'s is ``kd.linear_distillation_loss``), or either model's LM head cannot
    be fused (the reasons above; a head found unfusable during a forward is remembered, so at
    most one forward is spent finding out). The caller then computes full logits.

    The teacher runs under ``no_grad`` in its own dtype and yields its logits at the trained
    positions only; the student's LM head is replaced by the fused loss, which gets those rows'
    hidden states. ``options`` (``kd_weight``, ``temperature``, ``direction``, ``vocab_size``)
    go to the spec's ``distillation`` function, which ``build_loss`` gave the loss's own options
    (``chunk_size``).
    """
    import torch

    spec = LossSpec.of(loss_spec)
    fused = spec.distillation
    head = fusable_head(model)[0] if fused is not None else None
    teacher_head = fusable_head(teacher)[0] if head is not None else None
    if teacher_head is None:
        return None
    with torch.no_grad():
        teacher_rows, _ = _loss_inside_forward(teacher, teacher_head, inputs, labels,
                                               lambda selected, _targets, project: project(selected),
                                               contextlib.nullcontext)
    if teacher_rows is None:
        return None

    def compute(selected: Any, targets: Any, _project: Any) -> Any:
        return fused(selected, head.weight, teacher_rows.to(selected.device), targets, num_label_tokens,
                     bias=head.bias, **options)

    terms, _ = _loss_inside_forward(model, head, inputs, labels, compute, autocast or contextlib.nullcontext,
                                    returned=lambda result: result[0])
    return terms


def scored_rows(model: Any, inputs: dict[str, Any], labels: Any, compute: Callable[[Any, Any, Any], Any],
                autocast: Callable[[], Any] | None = None) -> Any:
    """Run ``model`` and return ``compute(hidden states [N, H], targets [N], project)`` over the
    positions whose next-token label is scored (not -100; HF-convention ``labels``), in row-major
    order: the LM head (``project``) is applied to those rows only, as ``rows`` losses are. None
    when the head cannot be fused (``fusable_head``): compute from the model's full logits then."""
    head, _ = fusable_head(model)
    if head is None:
        return None
    value, _ = _loss_inside_forward(model, head, inputs, labels, compute, autocast or contextlib.nullcontext)
    return value


def _loss_inside_forward(model: Any, head: Any, inputs: dict[str, Any], labels: Any,
                         compute: Callable[[Any, Any, Any], Any], autocast: Callable[[], Any],
                         returned: Callable[[Any], Any] = lambda value: value,
                         shifted: bool = False) -> tuple[Any, Any]:
    """Run ``model`` with its LM head's forward replaced by a probe that calls
    ``compute(hidden states of the trained positions [N, H], their targets [N], project)``, where
    ``project`` is the head's own forward (hidden states -> logits).

    Returns ``(value, None)`` when that worked, ``(None, output)`` when the probe found it could
    not fuse or was never called (``output.logits`` are then the model's full logits), ``(None, None)``
    when the model changed what the head returned (nothing usable; computed again unfused). The
    last two are remembered for ``fusable_head``. ``returned(value)`` is the tensor the probe
    hands back in place of the logits (checked to come out of the model unchanged). ``shifted``:
    ``labels`` are next-token targets already (``training_loss``).
    """
    from automodel_cli.components.loss.targets import shift_labels

    targets = (labels if shifted else shift_labels(labels)).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # on the labels' device (CPU: no sync)
    kept = targets.index_select(0, rows)
    state: dict[str, Any] = {}
    original = head.forward

    def probe(hidden: Any) -> Any:
        if tuple(hidden.shape[:-1]) != tuple(labels.shape):
            return _unfused(state, original, hidden, "its hidden states do not match the labels' shape")
        if _is_dtensor(head.weight) or _is_dtensor(hidden):
            return _unfused(state, original, hidden, "its lm_head is tensor-parallel")
        device = hidden.device
        selected = hidden.reshape(-1, hidden.size(-1)).index_select(0, rows.to(device, non_blocking=True))
        state["value"] = compute(selected, kept.to(device, non_blocking=True), original)
        return returned(state["value"])

    with _replaced_forward(head, probe), autocast():
        output = model(**inputs, use_cache=False)
    if "unfused" in state:
        _remember(model, state["unfused"])
        return None, output
    value = state.get("value")
    if value is None:  # the head's forward was never called: the output is all there is
        return None, output
    if output.logits is not returned(value):
        # The model transformed what it took for logits: this value is wrong; never fuse again.
        del output, value
        _remember(model, "the model changes the logits after its LM head")
        warnings.warn(f"{type(structure.unwrap(model)).__name__} changes the logits after its LM head; "
                      "computing full logits for the loss from now on.", stacklevel=3)
        return None, None
    return value, None


def _unfused(state: dict[str, Any], original: Callable[[Any], Any], hidden: Any, reason: str) -> Any:
    state["unfused"] = reason
    return original(hidden)


def _remember(model: Any, reason: str) -> None:
    with contextlib.suppress(TypeError):
        _HEADS[model] = (None, reason)


def _full_logits_loss(model: Any, inputs: dict[str, Any], labels: Any, num_label_tokens: Any,
                      spec: LossSpec, autocast: Callable[[], Any], shifted: bool = False) -> Any:
    with autocast():
        logits = model(**inputs, use_cache=False).logits
    return _logits_loss(spec, logits, labels, num_label_tokens, shifted)


def fusable_head(model: Any) -> tuple[Any, str | None]:
    """``(lm_head, None)`` when the loss may be computed from the head's input, else
    ``(None, reason)`` (``structure.output_head`` finds the head whatever it is; this says whether
    a fused or rows loss may replace it). Cached per model object."""
    try:
        cached = _HEADS.get(model)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    result = _find_head(model)
    with contextlib.suppress(TypeError):
        _HEADS[model] = result
    return result


def _find_head(model: Any) -> tuple[Any, str | None]:
    import torch.nn as nn

    head, _ = structure.output_head(model)
    if head is None:
        return None, "the model has no output embeddings (lm_head)"
    if type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        return None, f"its lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    config = getattr(structure.unwrap(model), "config", None)
    if config is not None:
        text = structure.text_config(config)
        for attribute in LOGIT_TRANSFORMS:
            for cfg in (config, text):
                if getattr(cfg, attribute, None) is not None:
                    return None, f"its config sets {attribute} (the logits are changed after the head)"
    return head, None


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def _replaced_forward(module: Any, forward: Callable[..., Any]):
    """Set ``module.forward`` for the duration of the block; the module's hooks still run."""
    missing = object()
    previous = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if previous is missing:
            del module.forward
        else:
            module.forward = previous
