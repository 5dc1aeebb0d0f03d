"""Build the metric loggers named in ``logging.loggers`` from the logger registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automodel_cli.config.compose import entry_options
from automodel_cli.errors import UserError


def build_loggers(cfg: Any, registries: Any, output_dir: Path) -> list[Any]:
    loggers = []
    for name in cfg.logging.loggers:
        entry = registries.loggers.get(name)
        if name == "jsonl":  # always written by the recipe
            continue
        missing = [module for module in entry.metadata.get("requires", []) if not _importable(module)]
        if missing:
            raise UserError(
                f"Logger `{name}` needs {', '.join(missing)}, which is not installed.",
                f"Install it (pip install 'automodel-cli[{name}]') or remove `{name}` from logging.loggers.",
            )
        options = entry_options(cfg, registries.loggers, name)
        loggers.append(entry.load()(output_dir=output_dir, options=options, run_config=cfg.redacted()))
    return loggers


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
