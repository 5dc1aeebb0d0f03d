"""FLOPs per token of mixture-of-experts models: the active experts and the routers, counted by hand
from the config and checked against the module walk on real transformers models."""

from __future__ import annotations

import pytest

from automodel_cli.components.training.flops import flops_per_token
from moe_models import KINDS, tiny_moe


def by_hand(kind: str, seq_len: int) -> int:
    """6 x (attention + top_k experts' gated MLPs + router per layer, plus the LM head) + attention scores."""
    h, layers, heads, kv, d, vocab = 64, 2, 4, 2, 16, 64
    sizes = KINDS[kind]
    experts = sizes.get("num_experts") or sizes["num_local_experts"]
    width = sizes.get("moe_intermediate_size") or sizes["intermediate_size"]
    per_layer = h * d * (2 * heads + 2 * kv) + sizes["num_experts_per_tok"] * 3 * h * width + h * experts
    return 6 * (layers * per_layer + h * vocab) + 12 * layers * heads * d * seq_len


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_moe_flops_count_the_routed_experts_and_the_router(kind):
    model = tiny_moe(kind)
    flops = flops_per_token(model, model.config, 32)
    assert flops.total == by_hand(kind, 32)
    assert "2 experts" in flops.note


def test_more_experts_per_token_cost_more():
    one, two = (flops_per_token(m, m.config, 8) for m in (tiny_moe(num_experts_per_tok=1), tiny_moe()))
    assert two.total - one.total == 6 * 2 * 3 * 64 * 32  # one more expert's gated MLP in each of 2 layers


@pytest.mark.parametrize("hub_id, active", [("mistralai/Mixtral-8x7B-Instruct-v0.1", 12.9), ("Qwen/Qwen3-30B-A3B", 3.3)])
def test_bundled_moe_presets_count_their_published_active_parameters(hub_id, active):
    """Mixtral 8x7B: 12.9B active parameters per token; Qwen3-30B-A3B: 3.3B (the embedding, which
    is no matmul, added back for the comparison; we count 12.88B and 3.35B). Built on the meta
    device from the bundled configs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_cli.assets import bundled_config

    config = AutoConfig.from_pretrained(bundled_config(hub_id))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    flops = flops_per_token(model, config, 4096)
    embedding = config.vocab_size * config.hidden_size
    assert abs((flops.matmul_parameters + embedding) / 1e9 - active) < 0.06  # the published figures' rounding
