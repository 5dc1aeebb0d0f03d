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
    """``OUTPUT_DIR/metrics.jsonl`` (option ``path``, relative to the output directory)."""
    from automodel_cli.components.logging.jsonl import METRICS_FILE, JsonlLogger

    options = dict(options or {})
    path = Path(options.pop("path", METRICS_FILE))
    if options:
        raise UserError(f"Unknown option for logger jsonl: {sorted(options)[0]}.", "The only option is `path`.")
    return JsonlLogger(path if path.is_absolute() else Path(output_dir) / path)


def wandb(*, output_dir: Path, options: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    from automodel_cli.components.logging.wandb_logger import WandbLogger

    return WandbLogger(options, run_config, output_dir)


def tensorboard(*, output_dir: Path, options: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    from automodel_cli.components.logging.tensorboard_logger import TensorBoardLogger

    return TensorBoardLogger(options, output_dir)
