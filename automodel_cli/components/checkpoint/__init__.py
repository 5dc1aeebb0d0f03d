"""Resumable training checkpoints (single process; sharded DCP state slots into ``state.py``).

Public API::

    save_checkpoint(run_dir, step, *, model, optimizer, scheduler, train_state, keep,
                    generators=None) -> Path
    find_checkpoint(spec, run_dir) -> Path | None
    load_checkpoint(path, *, model, optimizer, scheduler, generators=None) -> dict
    GracefulStop()                      # SIGTERM/SIGINT -> stop.requested

Names are resolved lazily so ``import automodel_cli.components.checkpoint`` (and
``GracefulStop``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "save_checkpoint": "automodel_cli.components.checkpoint.save",
    "FORMAT_VERSION": "automodel_cli.components.checkpoint.save",
    "find_checkpoint": "automodel_cli.components.checkpoint.load",
    "load_checkpoint": "automodel_cli.components.checkpoint.load",
    "read_meta": "automodel_cli.components.checkpoint.load",
    "GracefulStop": "automodel_cli.components.checkpoint.signals",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
