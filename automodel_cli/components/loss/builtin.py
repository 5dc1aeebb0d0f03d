"""The built-in losses as ``LossSpec``s, registered by ``plugins/losses.py`` and ``plugins/kernels.py``.

Their functions are named by ``"module:attr"`` strings, so declaring and registering them imports
no torch (nor liger-kernel or Transformer Engine); a run loads the one it chooses. All compute
the same value and gradients as ``masked_ce``; they differ in memory and speed
(docs/performance.md).
"""

from __future__ import annotations

from automodel_cli.components.loss.spec import LossSpec
from automodel_cli.config.schema import option

_LOSS = "automodel_cli.components.loss"

#: Options of the chunked losses: ``loss.chunked_ce.chunk_size``, ``loss.linear_ce.chunk_size``.
CHUNKED = {"chunk_size": option((int, type(None)), None, "Tokens per chunk; null: about 2**25 logits per chunk "
                                "(128 MiB in fp32).", ge=1)}

#: The reference: ``F.cross_entropy`` over the trained positions' logits.
MASKED_CE = LossSpec(kind="logits", fn=f"{_LOSS}.masked_ce:masked_cross_entropy", rows=True)
#: No fp32 copies of the logits: ``chunk_size`` rows upcast at a time.
CHUNKED_CE = LossSpec(kind="logits", fn=f"{_LOSS}.chunked_ce:chunked_cross_entropy", rows=True, options=CHUNKED)
#: No logits at all: the LM head fused with the loss, chunk by chunk; where the head cannot be
#: fused the logits exist anyway, and ``chunked_ce`` at least avoids their fp32 copies.
LINEAR_CE = LossSpec(kind="fused", fn=f"{_LOSS}.linear_ce:linear_cross_entropy", logits_fallback=CHUNKED_CE.fn,
                     distillation=f"{_LOSS}.kd:linear_distillation_loss", options=CHUNKED)
#: Liger-Kernel's fused linear cross-entropy (Triton; a CUDA GPU and the ``liger`` extra).
LIGER_LINEAR_CE = LossSpec(kind="fused", fn=f"{_LOSS}.kernels:liger_linear_cross_entropy",
                           logits_fallback=CHUNKED_CE.fn, check=f"{_LOSS}.kernels:check_liger")
#: Transformer Engine's cross-entropy kernel (a CUDA GPU and the ``te`` extra).
TE_CE = LossSpec(kind="logits", fn=f"{_LOSS}.kernels:te_cross_entropy", rows=True, check=f"{_LOSS}.kernels:check_te")
