"""The metric-logger protocol and helpers every logger shares.

A recipe talks to loggers through two calls, ``log(metrics, step)`` once per optimizer step
and ``close()`` at the end, so a plugin can add a backend without knowing the recipe; a logger
that can draw histograms may also implement ``log_histograms`` (optional).
No torch, wandb or tensorboard imports here: loggers pull those in when they are built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from automodel_cli.config.secrets import is_secret_name



@runtime_checkable
class MetricLogger(Protocol):
    """What every logger implements; ``step`` is the optimizer step the metrics belong to.

    A logger may also implement ``log_histograms(histograms, step)``: ``histograms`` maps a tag
    to the counts of its bins (bin i = the i-th count, e.g. tokens per expert of one layer);
    ``log_histograms`` below calls it and does nothing for a logger without it."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def log_histograms(logger: Any, histograms: Mapping[str, list[float]], step: int) -> None:
    """Hand ``histograms`` to ``logger.log_histograms`` when the logger has that optional method."""
    method = getattr(logger, "log_histograms", None)
    if histograms and callable(method):
        method(histograms, step)


def histogram_summary(counts: list[float]) -> dict[str, Any]:
    """The statistics of a histogram whose bin i holds ``counts[i]`` samples of the value i:
    ``num``, ``sum``, ``sum_squares``, ``min``, ``max`` (of the values present; 0 when empty)
    and ``edges`` (``len(counts) + 1`` bin edges, i - 0.5 .. i + 0.5)."""
    present = [i for i, count in enumerate(counts) if count]
    return {"num": float(sum(counts)), "sum": float(sum(i * c for i, c in enumerate(counts))),
            "sum_squares": float(sum(i * i * c for i, c in enumerate(counts))),
            "min": float(present[0]) if present else 0.0, "max": float(present[-1]) if present else 0.0,
            "edges": [i - 0.5 for i in range(len(counts) + 1)]}


def plain_number(value: Any) -> Any:
    """Turn 0-d tensors and numpy scalars into Python numbers (``.item()``), leave the rest."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key): plain_number(value) for key, value in metrics.items()}


def scalar_items(metrics: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """The real-number entries of ``metrics`` (booleans and strings skipped)."""
    for key, value in plain_metrics(metrics).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def redact(config: Any) -> Any:
    """A copy of a nested config with every secret-looking key removed (never sent to a tracking
    service; the caller redacts too, this is the backstop)."""
    if isinstance(config, Mapping):
        return {k: redact(v) for k, v in config.items() if not is_secret_name(str(k))}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    return config


class FanOutLogger:
    """Several loggers behind one; ``close`` closes all even if one fails."""

    def __init__(self, loggers: Iterable[MetricLogger]) -> None:
        self.loggers = list(loggers)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_histograms(self, histograms: Mapping[str, list[float]], step: int) -> None:
        for logger in self.loggers:
            log_histograms(logger, histograms, step)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # close the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]
