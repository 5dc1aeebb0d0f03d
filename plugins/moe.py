"""Built-in kinds of mixture-of-experts experts modules (``automodel list moe-blocks``).

The target names the ``ExpertKind`` by ``"module:attr"`` so that listing imports no torch. A
third-party plugin adds a kind the same way (docs/plugins.md, ``register_moe_blocks``).
"""

from __future__ import annotations

from automodel_cli import hookimpl


@hookimpl
def register_moe_blocks(registry):
    registry.add(
        "hf-fused", "automodel_cli.components.moe.experts:HF_FUSED",
        description="Hugging Face fused experts (Qwen-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek, ...): gated or "
                    "not, biases, transposed, interleaved gate/up.",
    )
