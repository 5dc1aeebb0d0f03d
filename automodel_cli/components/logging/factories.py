"""Uniform factories the logger registry points to.

Every registered logger is built as ``factory(*, output_dir, options, run_config)``:
``options`` is the logger's own config section (``logging.wandb``, ...) and ``run_config`` the
resolved, already redacted run config, for backends that record it. Keeping one signature lets
the recipe build any plugin's logger the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automodel_cli.components.logging.base import MetricLogger
from automodel_cli.errors import UserError


def jsonl(*, output_dir: Path, options: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    """``OUTPUT_DIR/metrics.jsonl``: its place in the run directory is fixed (``RunDir``), so it
    takes no options; every run writes it whether or not ``logging.loggers`` names it."""
    from automodel_cli.components.logging.jsonl import JsonlLogger
    from automodel_cli.run_layout import RunDir

    return JsonlLogger(RunDir(output_dir).metrics)


def wandb(*, output_dir: Path, options: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    from automodel_cli.components.logging.wandb_logger import WandbLogger

    return WandbLogger(options, run_config, output_dir)


def tensorboard(*, output_dir: Path, options: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    from automodel_cli.components.logging.tensorboard_logger import TensorBoardLogger

    return TensorBoardLogger(options, output_dir)
