"""Metric loggers: ``metrics.jsonl`` always, plus optional backends (wandb, tensorboard, plugins).

Public API::

    MetricLogger                        protocol: log(metrics, step), close(); optional log_histograms
    log_histograms(logger, histograms, step)   calls the optional method when the logger has it
    JsonlLogger(path); truncate_after(path, step) -> int; read_metrics(path)
    WandbLogger(config, run_config, output_dir)
    TensorBoardLogger(config, output_dir)
    FanOutLogger(loggers)

Importing this package (or any module in it) imports neither torch, wandb nor tensorboard;
each backend imports its library when it is constructed.
"""

from __future__ import annotations

from automodel_cli.components.logging.base import FanOutLogger, MetricLogger, log_histograms, redact
from automodel_cli.components.logging.jsonl import METRICS_FILE, JsonlLogger, read_metrics, truncate_after
from automodel_cli.components.logging.tensorboard_logger import TensorBoardLogger
from automodel_cli.components.logging.wandb_logger import WandbLogger

__all__ = [
    "FanOutLogger",
    "JsonlLogger",
    "METRICS_FILE",
    "MetricLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "log_histograms",
    "read_metrics",
    "redact",
    "truncate_after",
]
