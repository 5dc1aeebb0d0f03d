"""Resumable, sharded training checkpoints (torch.distributed.checkpoint) and their export.

Public API::

    save_checkpoint(run_dir, step, *, model, optimizer, scheduler, train_state, keep,
                    generators=None, tokenizer=None, extra_files=None) -> Path
    start_checkpoint(..., background=False) -> PendingCheckpoint   # .ready(), .finish() -> Path
    find_checkpoint(spec, run_dir) -> Path | None
    load_checkpoint(path, *, model, optimizer, scheduler, generators=None, verify=True) -> dict
    consolidate(source, out, *, dtype=None, merge_lora=False, base_model=None, ...) -> Result
    describe(source, *, verify=False) -> dict
    GracefulStop()                      # SIGTERM/SIGINT -> stop.requested

``save_checkpoint``, ``start_checkpoint`` and ``load_checkpoint`` are collective under a process group (every rank
calls them) and work unchanged in a single process without one; a checkpoint saved on N
ranks loads on any number of ranks. Layout: see ``layout.py``.

Names are resolved lazily so ``import automodel_cli.components.checkpoint`` (and
``GracefulStop``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "save_checkpoint": "automodel_cli.components.checkpoint.save",
    "start_checkpoint": "automodel_cli.components.checkpoint.save",
    "FORMAT_VERSION": "automodel_cli.components.checkpoint.save",
    "find_checkpoint": "automodel_cli.components.checkpoint.load",
    "load_checkpoint": "automodel_cli.components.checkpoint.load",
    "read_meta": "automodel_cli.components.checkpoint.load",
    "consolidate": "automodel_cli.components.checkpoint.consolidate",
    "describe": "automodel_cli.components.checkpoint.describe",
    "GracefulStop": "automodel_cli.components.checkpoint.signals",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
