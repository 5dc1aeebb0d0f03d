"""``LossSpec``: what a registered loss is, and the one object the recipes hand to ``head.py``.

A loss is a function plus a few facts about how it may be called; those facts decide how much of
the LM head the recipe computes for it (``head.py`` has the mechanics):

``kind="logits"``
    ``fn(logits [B, T, V], labels [B, T], num_label_tokens, **options)``: the model's full logits
    and Hugging Face-convention labels (the loss shifts them). ``rows=True`` says that ``fn``
    *also* accepts ``fn(logits [N, V], targets [N], num_label_tokens, **options)`` for the ``N``
    trained positions: the LM head then runs on those positions only.
``kind="fused"``
    ``fn(hidden [N, H], weight [V, H], targets [N], num_label_tokens, *, bias=None, **options)``:
    the loss gets the final hidden states of the trained positions and the LM head's parameters
    and computes the logits itself. ``logits_fallback`` (a logits loss; default ``masked_ce``)
    runs instead when the head cannot be fused (a tensor-parallel or adapted head, logits changed
    after the head); ``distillation`` (the signature of ``kd.linear_distillation_loss``, or None)
    lets ``automodel distill`` compute CE and KL from the hidden states too.

``targets`` are already shifted (``targets[i]`` is the token row ``i`` predicts) and may contain
-100. ``check(device)``, when given, runs once before the model and data load and raises a
``UserError`` naming the fix when the loss cannot run there (a missing package, no GPU).

``options`` is the loss's option table, ``{name: automodel_cli.config.option(...)}``. It is the
registry entry's option table (``LossRegistry.add`` takes it from the spec), so the values live
in the config at ``loss.NAME.OPTION`` and are validated with it; ``configured(values)`` hands each
function the values its signature names, as keyword arguments.

Function fields take a callable or a ``"module:attr"`` string naming one, like registry targets:
a spec declared with strings imports nothing until a run uses it (``builtin.py``: listing losses
or showing a config never imports torch). A plain function registered as a loss is
``LossSpec(kind="logits", fn=function)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from automodel_cli.errors import UserError
from automodel_cli.registry import import_dotted

KINDS = ("logits", "fused")
#: Fields that hold a function (or a ``"module:attr"`` string naming one).
FUNCTIONS = ("fn", "logits_fallback", "distillation", "check")
#: Fields whose functions receive the loss's option values.
CONFIGURED = ("fn", "logits_fallback", "distillation")
#: Function attributes that declared a loss's calling convention before ``LossSpec``. They are no
#: longer read, so a function carrying one is refused rather than called the wrong way.
RETIRED_ATTRIBUTES = ("fused", "rows", "logits_loss", "distillation")

Function = Callable[..., Any]


@dataclass(frozen=True, kw_only=True, repr=False)
class LossSpec:
    """A loss and how to call it (see the module docstring for each field)."""

    kind: str
    fn: Function | str
    rows: bool = False
    logits_fallback: Function | str | None = None
    distillation: Function | str | None = None
    check: Function | str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LossSpec.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in FUNCTIONS:
            value = getattr(self, name)
            if value is None and name != "fn" or callable(value) or isinstance(value, str) and ":" in value:
                continue
            raise ValueError(f"LossSpec.{name} must be a callable or a 'module:attr' string, got {value!r}")
        if self.kind == "logits" and (self.logits_fallback is not None or self.distillation is not None):
            raise ValueError("only a fused loss (kind='fused') has a logits_fallback or a distillation function")
        if self.kind == "fused" and self.rows:
            raise ValueError("rows=True describes a logits loss; a fused loss always receives the trained rows")
        if not isinstance(self.options, dict):
            raise ValueError(f"LossSpec.options must be a mapping of option names to automodel_cli.config.option(), "
                             f"got {type(self.options).__name__}")

    def __repr__(self) -> str:
        extras = [f"{name}={_name_of(getattr(self, name))}" for name in FUNCTIONS[1:] if getattr(self, name)]
        extras += ["rows=True"] * self.rows + [f"options={sorted(self.options)}"] * bool(self.options)
        return f"LossSpec(kind={self.kind!r}, fn={_name_of(self.fn)}{''.join(', ' + e for e in extras)})"

    @classmethod
    def of(cls, loss: LossSpec | Function, name: str | None = None) -> LossSpec:
        """``loss`` as a spec with its functions loaded: a spec as it is, a plain function as
        ``LossSpec(kind="logits", fn=loss)``. ``name`` (the registry name) is for messages."""
        if isinstance(loss, LossSpec):
            return loss.loaded(name)
        if not callable(loss):
            raise UserError(f"loss `{name or loss!r}` is a {type(loss).__name__}, neither a LossSpec nor a function.",
                            "Register an automodel_cli.components.loss.spec.LossSpec or a loss function.")
        retired = [attribute for attribute in RETIRED_ATTRIBUTES if hasattr(loss, attribute)]
        if retired:
            raise UserError(
                f"loss `{name or _name_of(loss)}` declares how to call it with function attributes "
                f"({', '.join(retired)}), which automodel no longer reads.",
                "Register it as automodel_cli.components.loss.spec.LossSpec(kind=..., fn=...) instead "
                "(docs/plugins.md, register_losses).")
        return cls(kind="logits", fn=loss)

    def loaded(self, name: str | None = None) -> LossSpec:
        """This spec with every ``"module:attr"`` function imported (``UserError`` if one cannot be)."""
        strings = {field_name: getattr(self, field_name) for field_name in FUNCTIONS}
        imported = {key: _load(value, key, name) for key, value in strings.items() if isinstance(value, str)}
        return replace(self, **imported) if imported else self

    def configured(self, values: Mapping[str, Any]) -> LossSpec:
        """This spec, loaded, with the option ``values`` bound to each function whose signature
        names them (all of them for a function taking ``**kwargs``); the others get none."""
        spec = self.loaded()
        bound = {name: _bind(getattr(spec, name), values) for name in CONFIGURED if getattr(spec, name) is not None}
        return replace(spec, **bound)

    @property
    def logits_fn(self) -> Function:
        """The function to call on the model's full ``[B, T, V]`` logits: ``fn`` for a logits
        loss, ``logits_fallback`` (default ``masked_ce``) for a fused one."""
        if self.kind == "logits":
            return self.fn  # type: ignore[return-value]
        if self.logits_fallback is not None:
            return self.logits_fallback  # type: ignore[return-value]
        from automodel_cli.components.loss.masked_ce import masked_cross_entropy

        return masked_cross_entropy


def _load(dotted: str, field_name: str, name: str | None) -> Function:
    try:
        obj = import_dotted(dotted)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"loss `{name or '?'}`: its {field_name} `{dotted}` cannot be loaded ({type(exc).__name__}: {exc}).",
            "Reinstall the plugin that registers it, or report the problem to its authors.",
        ) from exc
    if not callable(obj):
        raise UserError(f"loss `{name or '?'}`: its {field_name} `{dotted}` is a {type(obj).__name__}, not a function.",
                        "Report the problem to the authors of the plugin that registers it.")
    return obj


def _bind(fn: Function, values: Mapping[str, Any]) -> Function:
    accepted = _accepted(fn, values)
    return functools.partial(fn, **accepted) if accepted else fn


def _accepted(fn: Function, values: Mapping[str, Any]) -> dict[str, Any]:
    if not values:
        return {}
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(values)
    return {key: value for key, value in values.items() if key in parameters}


def _name_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(value)
