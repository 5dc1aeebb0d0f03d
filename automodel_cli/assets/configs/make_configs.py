"""Regenerate the bundled model configs in this directory (no network needed).

    python automodel_cli/assets/configs/make_configs.py [OUT_DIR]

Why: ``model.from_scratch=true`` with a preset (``automodel pretrain llama3``, ``automodel
benchmark llama3.1-8b``) needs only the architecture, not the weights, so these copies of the
presets' Hugging Face ``config.json`` let such runs start offline. Each file is named after the
hub id (``meta-llama--Llama-3.2-1B-Instruct.json``) and is used only when training from
scratch without a ``model.revision``; loading weights always reads the hub's own config.

The hyperparameters are those published in each model's ``config.json`` on the hub; every other
field takes the transformers default of the model type. ``PARAMETERS`` holds each model's
published parameter count, and this script refuses to write a config whose model (built on the
meta device) has a different count. Deliberate differences from the hub files:

- Phi-4-mini: its LongRoPE factors (long-context scaling) are not reproduced, so the config
  keeps the 4096-token window RoPE was trained on (``max_position_embeddings=4096``).
- The vision-language configs (Qwen2.5-VL 3B, Gemma 3 4B, Llava 1.5 7B, SmolVLM 256M) were
  written without network access from the published hyperparameters; their parameter counts
  match the published ones (checked below), processor settings are not part of config.json.
- The mixture-of-experts configs (Qwen3-30B-A3B, Mixtral 8x7B Instruct) were also written
  offline from the published hyperparameters; their parameter counts match the published ones.
- Token ids that matter only for generation (several EOS ids, chat-turn ids) are reduced to
  the primary BOS/EOS/pad ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# hub id -> (model_type, hyperparameters)
CONFIGS: dict[str, tuple[str, dict]] = {
    "meta-llama/Llama-3.2-1B-Instruct": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
        rope_parameters=LLAMA3_ROPE)),
    "meta-llama/Llama-3.2-3B-Instruct": ("llama", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
        rope_parameters=LLAMA3_ROPE)),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
        rope_parameters={**LLAMA3_ROPE, "factor": 8.0})),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        max_window_layers=21, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        max_window_layers=28, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "Qwen/Qwen3-0.6B": ("qwen3", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        max_window_layers=28, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "Qwen/Qwen3-8B": ("qwen3", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        max_window_layers=36, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "Qwen/Qwen3-30B-A3B": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, max_window_layers=48,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        router_aux_loss_coef=0.02, max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "google/gemma-2-2b-it": ("gemma2", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh")),
    "google/gemma-3-1b-it": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        query_pre_attn_scalar=256, sliding_window=512, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, sliding_window=2047)),
    "microsoft/Phi-4-mini-instruct": ("phi3", dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})),
    # Vision-language models (AutoModelForImageTextToText): the language model's and the vision
    # tower's hyperparameters as nested text_config / vision_config, as on the hub.
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, sliding_window=32768, max_window_layers=70, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                           tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True)),
    "google/gemma-3-4b-it": ("gemma3", dict(
        text_config=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                         hidden_activation="gelu_pytorch_tanh",
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1000000.0}}),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
        bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0)),
    "llava-hf/llava-1.5-7b-hf": ("llava", dict(
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         pad_token_id=32001),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=32001, tie_word_embeddings=False)),
    "HuggingFaceTB/SmolVLM-256M-Instruct": ("idefics3", dict(
        text_config=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        scale_factor=4, image_token_id=49190, tie_word_embeddings=False)),
}

#: Published parameter counts (embedding included once when tied).
PARAMETERS = {
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen/Qwen3-0.6B": 596_049_920,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 46_702_792_704,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "google/gemma-2-2b-it": 2_614_341_888,
    "google/gemma-3-1b-it": 999_885_952,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "microsoft/Phi-4-mini-instruct": 3_836_021_760,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976,
    "google/gemma-3-4b-it": 4_300_079_472,
    "llava-hf/llava-1.5-7b-hf": 7_063_427_072,
    "HuggingFaceTB/SmolVLM-256M-Instruct": 256_484_928,
}


def file_name(hub_id: str) -> str:
    return hub_id.replace("/", "--") + ".json"


def build(hub_id: str):
    from transformers import AutoConfig

    model_type, params = CONFIGS[hub_id]
    config = AutoConfig.for_model(model_type, **params)
    config.use_cache = False  # training default; generation passes use_cache=True explicitly
    return config


def count_parameters(config) -> int:
    import torch

    from automodel_cli.components.models.vlm import auto_class

    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    return sum(p.numel() for p in model.parameters())


def write_configs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for hub_id in CONFIGS:
        config = build(hub_id)
        found = count_parameters(config)
        if found != PARAMETERS[hub_id]:
            raise SystemExit(f"{hub_id}: {found:,} parameters, published {PARAMETERS[hub_id]:,}")
        data = config.to_diff_dict()
        data.pop("transformers_version", None)
        data["architectures"] = [type_name(config)]
        (out / file_name(hub_id)).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"{file_name(hub_id)}: {found:,} parameters")


def type_name(config) -> str:
    from automodel_cli.components.models.vlm import auto_class

    return auto_class(config)._model_mapping[type(config)].__name__


if __name__ == "__main__":
    write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
