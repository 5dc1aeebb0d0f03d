"""Regenerate the offline mixture-of-experts demo's ``config.json`` here (deterministic).

    python automodel_cli/assets/demo_moe/make_demo_moe_assets.py [OUT_DIR]

``automodel pretrain demo-moe`` trains a tiny Qwen3-MoE from random weights: 2 decoder layers,
each with a router sending every token to 2 of 8 experts, on the demo's one-token-per-character
vocabulary (the tokenizer is the demo's, ``model.tokenizer`` of the preset). Small enough to run
a hundred steps on a CPU in well under a minute, big enough for the router's balance loss and
the expert load to move. Weights are never shipped (``model.from_scratch=true``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
              intermediate_size=256, norm_topk_prob=True, router_aux_loss_coef=0.01, decoder_sparse_step=1,
              mlp_only_layers=[], rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=False)


def write_assets(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_assets(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
