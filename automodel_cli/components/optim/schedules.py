"""The built-in learning-rate schedules (``plugins/optimizers.py`` registers them): each is
``multiplier(step, *, warmup, total, min_ratio, options) -> float``, the factor of the peak rate
at 0-based ``step`` of ``total``, after a linear warmup of ``warmup`` steps."""

from __future__ import annotations

from typing import Any

from automodel_cli.components.optim.build import decay_curve, lr_multiplier


def cosine(step: int, *, warmup: int, total: int, min_ratio: float, options: dict[str, Any]) -> float:
    return lr_multiplier(step, warmup=warmup, total=total, kind="cosine", min_ratio=min_ratio)


def linear(step: int, *, warmup: int, total: int, min_ratio: float, options: dict[str, Any]) -> float:
    return lr_multiplier(step, warmup=warmup, total=total, kind="linear", min_ratio=min_ratio)


def constant(step: int, *, warmup: int, total: int, min_ratio: float, options: dict[str, Any]) -> float:
    return lr_multiplier(step, warmup=warmup, total=total, kind="constant", min_ratio=min_ratio)


def wsd(step: int, *, warmup: int, total: int, min_ratio: float, options: dict[str, Any]) -> float:
    """Warmup-stable-decay: the warmup, the peak rate held, then a decay to ``min_ratio`` over the
    last ``decay_fraction`` of the steps (never into the warmup). As in the other schedules, the
    rate at ``step`` is that of progress ``(step - start) / length`` of the decay, so the first
    decay step still runs at the peak."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = max(warmup, total - int(round(float(options["decay_fraction"]) * total)))
    if step < decay_start or total <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / (total - decay_start))
    return min_ratio + (1.0 - min_ratio) * decay_curve(progress, options["decay"])
