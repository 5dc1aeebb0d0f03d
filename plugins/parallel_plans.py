"""Built-in tensor-parallel plans, keyed by Hugging Face ``config.model_type``.

Targets are ``"module:attr"`` strings so that listing plans imports no torch; see
``automodel_cli.components.distributed.plans`` for what each plan shards. A third-party plugin
adds an architecture the same way::

    @hookimpl
    def register_parallel_plans(registry):
        registry.add("my_arch", "my_plugin.parallel:my_arch_plan")

where ``my_arch_plan(model, tp_mesh, sequence_parallel) -> {module FQN: ParallelStyle}``.
"""

from __future__ import annotations

from automodel_cli import hookimpl

_PLANS = "automodel_cli.components.distributed.plans"

# model_type -> (plan function, description)
PLANS: dict[str, tuple[str, str]] = {
    "llama": ("llama_plan", "Llama 2/3: q/k/v/gate/up column-, o/down row-parallel; vocab-parallel embedding and lm_head"),
    "mistral": ("llama_plan", "Mistral: as llama"),
    "qwen2": ("llama_plan", "Qwen2/2.5: as llama (q/k/v biases sharded with their weights)"),
    "qwen3": ("qwen3_plan", "Qwen3: as llama, per-head q/k norms replicated with summed gradients"),
    "gemma2": ("llama_plan", "Gemma 2: as llama (extra norms sequence-parallel under SP)"),
    "gemma3": ("gemma3_plan", "Gemma 3 (multimodal): language model as qwen3; vision tower replicated"),
    "gemma3_text": ("gemma3_plan", "Gemma 3 text-only: as qwen3"),
    "phi3": ("phi3_plan", "Phi-3/Phi-4-mini: fused qkv/gate_up sharded, outputs gathered (exact)"),
}


@hookimpl
def register_parallel_plans(registry):
    for model_type, (function, description) in PLANS.items():
        registry.add(model_type, f"{_PLANS}:{function}", description=description)
