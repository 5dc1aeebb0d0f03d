"""The memory plan's formulas on hand-computed cases (docs/memory.md derives them).

Parameter counts are checked against real Hugging Face models and real LoRA adapters built from
the same tiny configs; the byte terms against the per-element sizes the docs give, computed here
by hand for a tiny Llama; the CLI prints the table for `automodel plan` and `--dry-run`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from automodel_cli.components.training.memory_plan import (CPU_HEAP_SLACK, Architecture, Setup, adapter_parameters,
                                                            advise, gib, knobs, plan, table)

#: A tiny Llama: hidden 32, 4 heads of 8 (2 kv heads), MLP 64, 2 layers, vocabulary 96.
TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
H, I, L, HEADS, KV, V = 32, 64, 2, 4, 2 * 8, 96  # KV: the width of k and v (2 heads x 8)


def hf_model(config: dict):
    import transformers

    config = transformers.AutoConfig.for_model(**config)
    return transformers.AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("config", [
    TINY,
    {**TINY, "tie_word_embeddings": True},
    {**TINY, "num_key_value_heads": 4, "head_dim": 16},
    {**TINY, "model_type": "phi3", "pad_token_id": 0},  # fused qkv_proj and gate_up_proj
], ids=["llama", "tied", "head-dim", "phi3"])
def test_parameter_count_equals_the_real_model(config):
    model = hf_model(config)
    assert Architecture.from_config(config).parameters().total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method,targets", [("lora", "all-linear"), ("dora", "all-linear"),
                                            ("lora", ("q_proj", "v_proj"))])
def test_adapter_count_equals_peft(method, targets):
    from automodel_cli.components.peft.lora import apply_peft, count_parameters

    peft_cfg = SimpleNamespace(method=method, rank=4, alpha=8, dropout=0.0,
                               target_modules=targets if isinstance(targets, str) else list(targets))
    trainable, _ = count_parameters(apply_peft(hf_model(TINY), peft_cfg))
    setup = Setup(micro_batch=1, seq_len=8, peft=method, lora_rank=4, lora_targets=targets)
    assert adapter_parameters(Architecture.from_config(TINY), setup) == trainable


def test_unknown_architecture_gives_no_plan():
    assert Architecture.from_config({"model_type": "bert-ish", "d_model": 8}) is None
    assert Architecture.from_config({"text_config": {**TINY}, "model_type": "vlm"}) is not None


# ----------------------------------------------------------- parameters, gradients, optimizer
ARCH = Architecture.from_config(TINY)
N = ARCH.parameters().total  # 2 * 96 * 32 + 2 * (layer) + 32
LAYER = H * 32 + 2 * H * KV + 32 * H + 3 * H * I + 2 * H  # q, k, v, o, gate/up/down, two norms
ADAPTERS = L * 8 * ((H + 32) + 2 * (H + KV) + (32 + H) + 2 * (H + I) + (I + H))  # r=8, all-linear


def test_hand_counted_parameters():
    assert N == 2 * V * H + L * LAYER + H
    assert adapter_parameters(ARCH, Setup(micro_batch=1, seq_len=8, peft="lora")) == ADAPTERS


@pytest.mark.parametrize("setup,params,trainable_bytes", [
    (Setup(micro_batch=1, seq_len=8), 4 * N, 4 * N),  # fp32 full fine-tuning
    (Setup(micro_batch=1, seq_len=8, model_dtype="bfloat16"), 2 * N, 2 * N),  # bf16 weights, moments
    (Setup(micro_batch=1, seq_len=8, peft="lora"), 4 * N + 4 * ADAPTERS, 4 * ADAPTERS),
    (Setup(micro_batch=1, seq_len=8, peft="lora", model_dtype="bfloat16"), 2 * N + 4 * ADAPTERS, 4 * ADAPTERS),
    # A GPU with bf16, LoRA, auto dtype: the frozen base is kept in bf16, adapters in fp32.
    (Setup(micro_batch=1, seq_len=8, peft="lora", device="cuda"), 2 * N + 4 * ADAPTERS, 4 * ADAPTERS),
    # ... full fine-tuning keeps fp32 weights (bf16 autocast).
    (Setup(micro_batch=1, seq_len=8, device="cuda"), 4 * N, 4 * N),
])
def test_weights_gradients_and_adamw_state(setup, params, trainable_bytes):
    result = plan(ARCH, setup)
    assert result.parameters == params
    assert result.gradients == trainable_bytes
    assert result.optimizer == 2 * trainable_bytes  # exp_avg and exp_avg_sq
    assert result.optimizer_scratch == trainable_bytes


def test_sharding_divides_the_persistent_state():
    one = plan(ARCH, Setup(micro_batch=1, seq_len=8))
    four = plan(ARCH, Setup(micro_batch=1, seq_len=8, dp_shard=4))
    assert four.parameters == one.parameters // 4
    assert four.optimizer == one.optimizer // 4
    assert four.transient > 0  # the all-gathered root and layers


# ------------------------------------------------------------------------------ activations
def test_hand_computed_activations_fp32_full_fine_tuning():
    """Per token of a decoder layer in fp32 without autocast (docs/memory.md, "Activations"):
    two norms (fp32 input + normed output), the attention and MLP inputs, q/k/v, SDPA's
    output and log-sum-exp, the MLP's gate, silu(gate), up and product."""
    per_token_layer = 2 * (4 * H + 4 * H) + 2 * 4 * H + 4 * (32 + 2 * KV) + 4 * 32 + 4 * HEADS + 4 * 4 * I
    per_token_outside = 2 * 4 * 8 + (4 * H + 4 * H) + 4 * H  # rotary cos/sin, final norm, head input
    tokens = 3 * 16
    result = plan(ARCH, Setup(micro_batch=3, seq_len=16))
    assert result.activations == result.activations_none == tokens * (L * per_token_layer + per_token_outside)
    # Full checkpointing keeps each layer's fp32 input only.
    assert result.activations_full == tokens * (L * 4 * H + per_token_outside)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them():
    small = plan(ARCH, Setup(micro_batch=2, seq_len=16))
    double = plan(ARCH, Setup(micro_batch=4, seq_len=16))
    assert double.activations == 2 * small.activations
    checkpointed = plan(ARCH, Setup(micro_batch=2, seq_len=16, activation_checkpointing="full"))
    assert checkpointed.activations == small.activations_full < small.activations
    assert checkpointed.phases["layer recompute"] > checkpointed.activations  # one layer recomputed


def test_context_parallelism_shards_state_and_splits_tokens():
    """cp=2: parameters are sharded over dp_shard x cp; a rank keeps the activations of half the
    tokens plus, per layer, the gathered keys and values (repeated to the query heads) and the
    [batch, 1, seq / cp, seq] boolean mask once."""
    one = plan(ARCH, Setup(micro_batch=2, seq_len=16))
    half = plan(ARCH, Setup(micro_batch=1, seq_len=16))  # the same tokens as one cp rank's share
    cp = plan(ARCH, Setup(micro_batch=2, seq_len=16, cp=2))
    sharded = plan(ARCH, Setup(micro_batch=2, seq_len=16, dp_shard=2))
    assert cp.parameters == sharded.parameters == one.parameters // 2
    gathered_kv = L * 2 * 2 * 16 * HEADS * 8 * 4  # layers x (k, v) x batch x seq x q heads x head_dim x fp32
    mask = 2 * 16 * 16 // 2
    assert cp.activations == half.activations + gathered_kv + mask
    assert cp.logits == half.logits  # the loss sees the local tokens only


def test_masked_loss_keeps_fp32_log_probabilities():
    rows = 2 * 16
    result = plan(ARCH, Setup(micro_batch=2, seq_len=16))
    # log_softmax kept (4 B), its gradient and the logits' gradient in backward: 12 B per logit.
    assert result.logits == 12 * rows * V
    assert result.peak == max(result.phases.values())
    assert result.phases["loss backward"] == (result.parameters + result.optimizer + result.activations
                                              + result.logits + result.allocator_slack)
    assert result.phases["optimizer step"] == (result.parameters + result.gradients + result.optimizer
                                               + result.optimizer_scratch)


def test_fused_loss_has_no_logits_of_the_whole_batch():
    from automodel_cli.components.loss.targets import CHUNK_ELEMENTS

    vocab, rows = 50_000, 16 * 1024
    big = Architecture.from_config({**TINY, "vocab_size": vocab})
    setup = Setup(micro_batch=16, seq_len=1024)
    masked = plan(big, setup)
    fused = plan(big, replace(setup, loss_name="linear_ce", loss_kind="fused"))
    # The head's fp32 weight gradient, the hidden states' gradient, one chunk of fp32 logits
    # with logsumexp's two temporaries: 12 B per value of the chunk.
    chunk_rows = CHUNK_ELEMENTS // vocab
    assert fused.logits == 4 * vocab * H + 4 * rows * H + 12 * chunk_rows * vocab
    assert masked.logits == 12 * rows * vocab
    assert fused.logits < masked.logits / 10
    unfusable = plan(replace(big, logit_transform=True), replace(setup, loss_name="linear_ce", loss_kind="fused"))
    assert unfusable.notes and "fallback" in unfusable.notes[0]


def test_a_sequence_classifier_has_a_score_head_and_no_vocabulary_logits():
    """automodel classify: the head is labels x hidden (not vocab x hidden) and scores one
    position per sequence, so the loss holds a few floats, not a logit per token and word."""
    setup = Setup(micro_batch=2, seq_len=16)
    lm = plan(ARCH, setup)
    classifier = plan(ARCH, replace(setup, score_labels=3))
    head = 0 if ARCH.tied else V * H
    assert classifier.total_parameters == lm.total_parameters - head + 3 * H
    assert classifier.logits == 2 * 4 * 2 * 3 + 4 * 3 * H  # scores and their gradient; the head's fp32 gradient
    assert classifier.logits < lm.logits / 10
    lines = table(classifier, replace(setup, score_labels=3))
    assert any(line.startswith("score head") for line in lines) and not any("loss logits" in line for line in lines)
    # the fused loss has nothing to fuse in a classifier: it is never advised
    assert "loss.name=linear_ce" not in [knob.setting for knob in knobs(ARCH, replace(setup, score_labels=3), None)]


def test_host_allocator_slack_only_on_cpu():
    on_cpu = plan(ARCH, Setup(micro_batch=2, seq_len=16))
    assert on_cpu.allocator_slack == int(CPU_HEAP_SLACK * on_cpu.activations_none) > 0
    on_gpu = plan(ARCH, Setup(micro_batch=2, seq_len=16, device="cuda"))
    assert on_gpu.allocator_slack == 0


# ----------------------------------------------------------------------------------- advice
def test_advice_names_the_knob_that_makes_it_fit():
    big = Architecture.from_config({**TINY, "vocab_size": 50_000, "hidden_size": 256, "num_attention_heads": 8,
                                    "num_key_value_heads": 8, "intermediate_size": 512})
    setup = Setup(micro_batch=8, seq_len=512)
    before = plan(big, setup).peak
    found = knobs(big, setup, capacity=None)
    assert [k.saving for k in found] == sorted((k.saving for k in found), reverse=True)
    assert {k.setting.split(" (")[0] for k in found} >= {"--peft lora", "train.activation_checkpointing=full",
                                                         "train.micro_batch_size=4", "loss.name=linear_ce"}
    capacity = int(before * 0.6)
    advice = advise(big, setup, capacity)
    assert advice.fits and advice.peak <= capacity < before
    assert advice.saving == max(k.saving for k in knobs(big, setup, capacity) if k.fits)


# -------------------------------------------------------------------------------------- CLI
ROWS = ("parameters", "gradients", "optimizer state", "activations", "loss logits", "peak", "device")


def test_plan_command_prints_the_table(cli):
    result = cli("plan", "demo", "train.micro_batch_size=4", "--peft", "lora")
    assert result.exit_code == 0, result.stderr
    assert "LoRA r=8" in result.stdout and "micro-batch 4 x" in result.stdout
    lines = result.stdout.splitlines()
    for row in ROWS:
        assert any(line.strip().startswith(row) for line in lines), (row, result.stdout)


def test_a_vision_language_plan_says_it_counts_the_language_model_only(cli):
    result = cli("plan", "demo-vlm")
    assert result.exit_code == 0, result.stderr
    assert "counts the language model only" in result.stdout
    assert "counts the language model only" not in cli("plan", "demo").stdout


def test_plan_json_and_dry_run_agree(cli):
    from automodel_cli.assets import demo_dir

    as_json = cli("plan", "demo", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["bytes"]["peak"] == max(data["phases"].values())
    demo_config = json.loads((demo_dir() / "config.json").read_text())
    assert data["total_parameters"] == Architecture.from_config(demo_config).parameters().total
    dry = cli("finetune", "demo", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "# memory plan per process (finetune" in dry.stdout
    peak_line = next(line for line in dry.stdout.splitlines() if line.startswith("#   peak "))
    assert gib(data["bytes"]["peak"]) in peak_line


def test_plan_of_an_unknown_architecture_is_a_note(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "d_model": 8}))
    result = cli("plan", f"model.path={tmp_path}")
    assert result.exit_code == 0, result.stderr
    assert "memory plan: none" in result.stdout and "hidden_size" in result.stdout


def test_plan_does_not_fit_names_the_knob(cli):
    result = cli("plan", "llama3.2-1b", "launch.device_memory_gib=40")
    assert result.exit_code == 0, result.stderr
    assert "does NOT fit" in result.stdout
    assert "helps most: --peft lora" in result.stdout and "fits)" in result.stdout


def test_plan_of_an_unknown_target_is_a_user_error(cli):
    result = cli("plan", "no-such-model")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert "no-such-model" in result.stderr


QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, intermediate_size=6144,
                     num_experts=128, num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False)


def test_mixture_of_experts_sizes_use_the_expert_width():
    """Qwen3-30B-A3B's experts are moe_intermediate_size wide (its intermediate_size is for dense
    layers): 30.5B parameters as published; Mixtral 8x7B: 46.7B; Qwen1.5-MoE-A2.7B's shared
    expert counts too (14.3B)."""
    from automodel_cli.components.training.memory_plan import Architecture

    assert round(Architecture.from_config(QWEN3_30B_A3B).parameters().total / 1e9, 1) == 30.5
    mixtral = dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                   vocab_size=32000)
    assert round(Architecture.from_config(mixtral).parameters().total / 1e9, 1) == 46.7
    qwen15 = dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                  intermediate_size=5632, num_experts=60, num_experts_per_tok=4, vocab_size=151936)
    assert round(Architecture.from_config(qwen15).parameters().total / 1e9, 1) == 14.3


def test_expert_parallelism_splits_the_experts_ep_ways():
    """Under expert parallelism the routed experts are split ep ways (and whole on the dp_shard/ep
    ranks that share them); the rest stays FSDP-sharded over dp_shard."""
    arch = Architecture.from_config(QWEN3_30B_A3B)
    counts = arch.parameters()
    experts = counts.layers * counts.layer_experts
    rest = counts.total - experts
    for ep in (1, 2, 4, 8):
        result = plan(arch, Setup(micro_batch=1, seq_len=1024, device="cuda", dp_shard=8, ep=ep, model_dtype="bfloat16"))
        held = rest / 8 + experts / (ep if ep > 1 else 8)
        assert abs(result.parameters - 2 * held) <= 1e-9 * result.parameters
