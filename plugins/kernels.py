"""Losses backed by optional GPU kernels, registered like any plugin's.

Registering imports neither liger-kernel nor Transformer Engine (the specs name their functions
by ``"module:attr"``); the kernels are imported on first use, and selecting one without its
package or without a CUDA GPU stops the run before anything loads, with the extra to install.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.components.loss import builtin


@hookimpl
def register_losses(registry):
    registry.add(
        "liger_linear_ce", builtin.LIGER_LINEAR_CE,
        description="Liger-Kernel's fused linear cross-entropy (Triton; CUDA; extra: liger).",
    )
    registry.add(
        "te_ce", builtin.TE_CE,
        description="Transformer Engine's cross-entropy kernel (CUDA; extra: te).",
    )
