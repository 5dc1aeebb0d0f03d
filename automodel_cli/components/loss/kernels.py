"""Losses backed by optional GPU kernels: Liger-Kernel's fused linear cross-entropy (Triton) and
Transformer Engine's cross-entropy.

Why they are separate from ``linear_ce``/``chunked_ce``: those are plain PyTorch and run
everywhere; these need a CUDA GPU and a package installed as an extra
(``pip install 'automodel-cli[liger]'`` / ``'automodel-cli[te]'``). Nothing here imports the
kernels until a loss is called, so registering them (``plugins/kernels.py``) costs nothing and a
machine without them never notices, unless the loss is selected: then its spec's ``check``
(``builtin.py``; run before anything is loaded) or the first call raises a ``UserError`` naming
the extra.

Both keep our loss contract: a sum over trained tokens divided by ``num_label_tokens``.

Liger's kernels are Triton, so with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, set before
Triton is imported) ``liger_linear_ce`` also runs on CPU, slowly: that is how the test suite
checks it against ``masked_ce`` on a machine without a GPU, and a way to debug it anywhere.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from automodel_cli.components.loss.targets import IGNORE_INDEX, as_rows, normaliser
from automodel_cli.errors import UserError

LIGER = ("liger_linear_ce", "liger_kernel", "liger-kernel", "liger")
TE = ("te_ce", "transformer_engine", "transformer-engine", "te")


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _require(spec: tuple[str, str, str, str], device: Any, *, interpretable: bool = False) -> None:
    loss, module, package, extra = spec
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"loss.name={loss} needs the {package} package, which is not installed.",
            f"Install it with `pip install 'automodel-cli[{extra}]'` (CUDA GPUs only), or use "
            f"loss.name=linear_ce, which needs nothing extra and runs everywhere.",
        )
    kind = getattr(device, "type", str(device))
    if kind == "cuda" or (interpretable and kind == "cpu" and triton_interpreter_on()):
        return
    raise UserError(
        f"loss.name={loss} runs {package} kernels, which need a CUDA GPU; this run is on {kind}.",
        "Use loss.name=linear_ce (the same fused loss in plain PyTorch) on this machine"
        + (" (or set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly, for debugging)."
           if interpretable else "."),
    )


def check_liger(device: Any) -> None:
    """Raise a ``UserError`` unless liger-kernel is importable and ``device`` is a CUDA device
    (or the CPU with Triton's interpreter on)."""
    _require(LIGER, device, interpretable=True)


def check_te(device: Any) -> None:
    """Raise a ``UserError`` unless Transformer Engine is importable and ``device`` is CUDA."""
    _require(TE, device)


def liger_linear_cross_entropy(hidden, weight, labels, num_label_tokens=None, *, bias=None):
    """Liger-Kernel's fused linear cross-entropy (Triton), summed over trained tokens and divided
    by ``num_label_tokens``. Same layouts as ``linear_ce`` (``[B, T, H]`` + unshifted labels or
    ``[N, H]`` + shifted targets)."""
    check_liger(hidden.device)
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    rows, targets = as_rows(hidden, labels)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    total = loss_fn(weight, rows.contiguous(), targets.contiguous(), bias)
    if isinstance(total, tuple):  # versions that can also return a z-loss
        total = total[0]
    return total / normaliser(num_label_tokens, targets)



def te_cross_entropy(logits, labels, num_label_tokens=None):
    """Transformer Engine's cross-entropy kernel (fp32 math on bf16/fp32 logits), summed over
    trained tokens and divided by ``num_label_tokens``. Same layouts as ``masked_ce``."""
    check_te(logits.device)
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    rows, targets = as_rows(logits, labels)
    # TE takes [batch, seq, vocab] and returns one loss per position (reduce_loss=False). Ignored
    # positions get a valid dummy target and a zero weight, which works whether or not the
    # installed TE version knows `ignore_idx`.
    valid = (targets != IGNORE_INDEX).unsqueeze(0)
    per_token = parallel_cross_entropy(rows.unsqueeze(0).contiguous(), targets.clamp(min=0).unsqueeze(0).contiguous(),
                                       0.0, False)
    total = (per_token.float() * valid).sum()
    return total / normaliser(num_label_tokens, targets)
