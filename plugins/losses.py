"""Built-in losses."""

from __future__ import annotations

from automodel_cli import hookimpl


@hookimpl
def register_losses(registry):
    registry.add(
        "masked_ce",
        "automodel_cli.components.loss.masked_ce:masked_cross_entropy",
        description="Cross-entropy over trained tokens, normalised by the step's label-token count.",
    )
