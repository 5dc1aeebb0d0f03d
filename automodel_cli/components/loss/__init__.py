"""Loss functions and how the recipes call them.

Every loss returns the sum of per-token losses over trained positions (label not -100) divided
by ``num_label_tokens``. Built-in losses take HF-convention (unshifted) labels with
``[batch, seq, ...]`` inputs, or already shifted targets with ``[rows, ...]`` inputs
(``targets.py``). ``head.py`` decides, from attributes on the function (``rows``, ``fused``), how
much of the LM head a loss needs: ``masked_ce`` (reference), ``chunked_ce`` (no fp32 logits
copies), ``linear_ce`` (fused head, no logits at all), ``kernels.py`` (optional GPU kernels).
"""
