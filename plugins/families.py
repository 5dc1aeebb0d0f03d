"""The built-in model families: one table, read by the model-preset and parallel-plan plugins.

A family is the Hugging Face ``model_type``(s) it covers (causal LMs, and vision-language
models, which load with ``AutoModelForImageTextToText``), the tensor-parallel plan each uses
(a function in ``automodel_cli.components.distributed.plans``) and its presets (short names
for hub ids, with the defaults that suit it). Adding a family is one entry here; any other
causal LM already trains through ``model.path`` without one (a family adds presets and tensor
parallelism). For ``model.from_scratch`` runs offline, a preset's hub config can also be
bundled (``automodel_cli/assets/configs/make_configs.py``); without it the config is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """``plans``: model_type -> (plan function, what it shards); ``presets``: preset name ->
    (hub id, description, config defaults)."""

    plans: dict[str, tuple[str, str]]
    presets: dict[str, tuple[str, str, dict]] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family(
        {"llama": ("llama_plan", "Llama 2/3: q/k/v/gate/up column-, o/down row-parallel; vocab-parallel "
                                 "embedding and lm_head")},
        {"llama3": ("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct (alias of llama3.2-1b)", {}),
         "llama3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct", {}),
         "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct", {}),
         "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct", {})}),
    "qwen2": Family(
        {"qwen2": ("llama_plan", "Qwen2/2.5: as llama (q/k/v biases sharded with their weights)")},
        {"qwen2.5": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct (alias of qwen2.5-0.5b)", {}),
         "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct", {}),
         "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5 7B Instruct", {})}),
    "qwen3": Family(
        {"qwen3": ("qwen3_plan", "Qwen3: as llama, per-head q/k norms replicated with summed gradients")},
        {"qwen3": ("Qwen/Qwen3-0.6B", "Qwen3 0.6B (alias of qwen3-0.6b)", {}),
         "qwen3-0.6b": ("Qwen/Qwen3-0.6B", "Qwen3 0.6B", {}),
         "qwen3-8b": ("Qwen/Qwen3-8B", "Qwen3 8B", {})}),
    "mistral": Family(
        {"mistral": ("llama_plan", "Mistral: as llama")},
        {"mistral": ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3", {})}),
    "gemma2": Family(
        {"gemma2": ("llama_plan", "Gemma 2: as llama (extra norms sequence-parallel under SP)")},
        # Gemma 2 uses attention logit soft-capping, which only the eager kernel implements exactly.
        {"gemma2": ("google/gemma-2-2b-it", "Gemma 2 2B IT", {"model": {"attn_implementation": "eager"}})}),
    "gemma3": Family(
        {"gemma3": ("gemma3_plan", "Gemma 3 (multimodal): language model as qwen3; vision tower replicated"),
         "gemma3_text": ("gemma3_plan", "Gemma 3 text-only: as qwen3")},
        {"gemma3": ("google/gemma-3-1b-it", "Gemma 3 1B IT (text)", {}),
         "gemma3-vl": ("google/gemma-3-4b-it", "Gemma 3 4B IT, vision-language (SigLIP vision tower)", {})}),
    # Vision-language models: the tensor-parallel plan shards the language model only; the vision
    # tower and projector are replicated on every tensor-parallel rank (FSDP2 still shards them).
    "qwen2_vl": Family(
        {"qwen2_vl": ("llama_plan", "Qwen2-VL: language model as qwen2; vision tower replicated"),
         "qwen2_5_vl": ("llama_plan", "Qwen2.5-VL: language model as qwen2; vision tower replicated")},
        {"qwen2.5-vl": ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL 3B Instruct, vision-language", {})}),
    "llava": Family(
        {},
        {"llava": ("llava-hf/llava-1.5-7b-hf", "Llava 1.5 7B, vision-language (CLIP vision tower)", {})}),
    "smolvlm": Family(
        {},
        {"smolvlm": ("HuggingFaceTB/SmolVLM-256M-Instruct", "SmolVLM 256M Instruct, vision-language (Idefics3)",
                     {})}),
    # Mixture-of-experts: attention sharded as the dense family's; router, experts and shared
    # experts replicated on every tensor-parallel rank (expert parallelism shards the experts).
    "qwen3_moe": Family(
        {"qwen3_moe": ("qwen3_moe_plan", "Qwen3-MoE: attention as qwen3; router and experts replicated")},
        {"qwen3-moe": ("Qwen/Qwen3-30B-A3B", "Qwen3 30B-A3B, mixture of experts (128 experts, 8 active)", {})}),
    "qwen2_moe": Family(
        {"qwen2_moe": ("mixtral_plan", "Qwen1.5/2-MoE: attention as qwen2; router, experts and shared "
                                       "expert replicated")}),
    "mixtral": Family(
        {"mixtral": ("mixtral_plan", "Mixtral: attention as llama; router and experts replicated")},
        {"mixtral": ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral 8x7B Instruct, mixture of experts "
                                                            "(8 experts, 2 active)", {})}),
    "phi3": Family(
        {"phi3": ("phi3_plan", "Phi-3/Phi-4-mini: fused qkv/gate_up sharded, outputs gathered (exact)")},
        {"phi3": ("microsoft/Phi-3-mini-4k-instruct", "Phi-3 mini 4k Instruct", {"data": {"max_length": 4096}}),
         "phi4": ("microsoft/Phi-4-mini-instruct", "Phi-4 mini Instruct", {})}),
}
