"""Built-in losses. All three compute the same value and gradients (tests hold them to 1e-5 in
fp32); they differ in memory and speed (docs/performance.md)."""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.config.schema import option

#: Options of the chunked losses: ``loss.chunked_ce.chunk_size``, ``loss.linear_ce.chunk_size``.
CHUNKED = {"chunk_size": option((int, type(None)), None, "Tokens per chunk; null: about 2**25 logits per chunk "
                                "(128 MiB in fp32).", ge=1)}


@hookimpl
def register_losses(registry):
    registry.add(
        "masked_ce",
        "automodel_cli.components.loss.masked_ce:masked_cross_entropy",
        description="Cross-entropy over trained tokens, normalised by the step's label-token count.",
    )
    registry.add(
        "chunked_ce",
        "automodel_cli.components.loss.chunked_ce:chunked_cross_entropy",
        description="masked_ce computed loss.chunked_ce.chunk_size rows at a time: no fp32 copies of the logits.",
        options=CHUNKED,
    )
    registry.add(
        "linear_ce",
        "automodel_cli.components.loss.linear_ce:linear_cross_entropy",
        description="LM head fused with the loss, in chunks: full logits never exist (large vocabularies).",
        options=CHUNKED,
    )
