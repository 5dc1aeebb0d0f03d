"""Built-in losses (``components/loss/builtin.py`` declares them). All three compute the same
value and gradients (tests hold them to float32 rounding); they differ in memory and speed
(docs/performance.md)."""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.components.loss import builtin


@hookimpl
def register_losses(registry):
    registry.add(
        "masked_ce", builtin.MASKED_CE,
        description="Cross-entropy over trained tokens, normalised by the step's label-token count.",
    )
    registry.add(
        "chunked_ce", builtin.CHUNKED_CE,
        description="masked_ce computed loss.chunked_ce.chunk_size rows at a time: no fp32 copies of the logits.",
    )
    registry.add(
        "linear_ce", builtin.LINEAR_CE,
        description="LM head fused with the loss, in chunks: full logits never exist (large vocabularies).",
    )
