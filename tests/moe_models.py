"""Tiny mixture-of-experts models for the MoE tests: Qwen3-MoE and Mixtral configs (8 experts,
top-2, 2 layers, hidden 64) on the demo tokenizer's vocabulary, built from configs or saved with
``save_pretrained`` (which writes the experts in the hub's per-expert format)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from automodel_cli.assets import demo_dir
from model_dirs import TOKENIZER_FILES

#: The sizes every tiny MoE shares; ``kind`` picks the architecture.
COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, use_cache=False)
KINDS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                      norm_topk_prob=True, router_aux_loss_coef=0.01),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, router_aux_loss_coef=0.02),
}


#: More architectures, for the tests that check every family the same way (routers, experts
#: layouts): OLMoE, Qwen2-MoE (shared expert), GPT-OSS (transposed experts with biases, sliding
#: layers), Granite-MoE, DeepSeek-V3 (sigmoid, group-limited routing with a bias; no aux loss).
MORE_KINDS = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, router_aux_loss_coef=0.01),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=64, router_aux_loss_coef=0.001),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, router_aux_loss_coef=0.9,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, router_aux_loss_coef=0.01),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=0, intermediate_size=64, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_group=2, topk_group=1,
                        num_key_value_heads=4),
}


def tiny_moe_config(kind: str = "qwen3_moe", **overrides: object):
    """The ``transformers`` config of a tiny ``kind`` MoE (``overrides`` win)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(kind, **{**COMMON, **{**KINDS, **MORE_KINDS}[kind], **overrides})


def tiny_moe(kind: str = "qwen3_moe", seed: int = 0, **overrides: object):
    """A randomly initialised tiny ``kind`` MoE causal LM (float32, train mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(kind, **overrides))
    return model.train()


def save_moe_model(directory: Path, kind: str = "qwen3_moe", seed: int = 0, **overrides: object) -> Path:
    """``tiny_moe`` saved with ``save_pretrained`` plus the demo tokenizer: a model directory that
    ``model.path`` can name."""
    tiny_moe(kind, seed, **overrides).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_dir() / name, directory / name)
    return Path(directory)
