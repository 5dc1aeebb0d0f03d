"""Build the metric loggers named in ``logging.loggers`` from the logger registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automodel_cli.config.compose import entry_options
from automodel_cli.errors import UserError


def build_loggers(cfg: Any, registries: Any, output_dir: Path) -> list[Any]:
    """Every logger of ``logging.loggers`` but metrics.jsonl (always written by the run), each
    built as ``factory(output_dir=..., options=..., run_config=...)``. When one fails, the ones
    already built are closed before the error goes on."""
    loggers: list[Any] = []
    try:
        for name in cfg.logging.loggers:
            entry = registries.loggers.get(name)
            if name == "jsonl":
                continue
            _require_modules(entry)
            options = entry_options(cfg, registries.loggers, name)
            loggers.append(entry.load()(output_dir=output_dir, options=options, run_config=cfg.redacted()))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers


def _require_modules(entry: Any) -> None:
    """The modules a logger declared with ``requires`` must be importable (an install hint if not)."""
    missing = [module for module in entry.metadata.get("requires", []) if not _importable(module)]
    if not missing:
        return
    # A built-in logger's packages come with automodel's extra of the same name; a plugin's
    # logger names the modules it needs.
    install = f"'automodel-cli[{entry.name}]'" if entry.provider.builtin else " ".join(missing)
    raise UserError(f"Logger `{entry.name}` ({entry.provider}) needs {', '.join(missing)}, which is not installed.",
                    f"Install it (pip install {install}) or remove `{entry.name}` from logging.loggers.")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
