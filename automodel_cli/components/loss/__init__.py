"""Loss functions and how the recipes call them.

Every loss returns the sum of per-token losses over trained positions (label not -100) divided
by ``num_label_tokens``. Built-in losses take HF-convention (unshifted) labels with
``[batch, seq, ...]`` inputs, or already shifted targets with ``[rows, ...]`` inputs
(``targets.py``). A loss is registered as a ``LossSpec`` (``spec.py``: its kind, fallback,
distillation function, check and options); ``head.py`` decides from it how much of the LM head
the loss needs. The built-in specs (``builtin.py``): ``masked_ce`` (reference), ``chunked_ce``
(no fp32 logits copies), ``linear_ce`` (fused head, no logits at all; ``fused_linear.py``),
``kernels.py`` (optional GPU kernels).
"""
