"""`automodel benchmark`: JSON output, warm-up excluded, the FLOPs formula against hand counts,
MFU against a given peak, presets offline, real text data and bad input."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli

TINY = ["benchmark.seq_len=32", "benchmark.batch_size=2", "benchmark.steps=3", "benchmark.warmup_steps=2"]


def demo_flops_by_hand(seq_len: int) -> int:
    """The bundled demo Llama: L=2, h=128, 4 query heads and 2 KV heads of 32, MLP 352, V=64 (tied)."""
    q, k, v, o = 128 * 4 * 32, 128 * 2 * 32, 128 * 2 * 32, 4 * 32 * 128
    mlp = 3 * 128 * 352  # gate, up, down
    lm_head = 128 * 64  # counted although tied to the embedding: it is a matmul
    n_matmul = 2 * (q + k + v + o + mlp) + lm_head
    assert n_matmul == 376_832
    return 6 * n_matmul + 12 * 2 * 4 * 32 * seq_len


def test_json_output_fields_warmup_excluded_and_mfu_from_the_given_peak(cli):
    result = cli("benchmark", "demo", "--json", "train.peak_tflops=0.5", *TINY)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    for key in ("tokens_per_s", "tokens_per_s_per_device", "step_time_s", "tflops_per_s_per_device", "mfu",
                "peak_tflops_per_device", "peak_memory_bytes", "flops_per_token", "device", "devices"):
        assert key in out, key
    assert set(out["step_time_s"]) == {"mean", "p50", "p90", "min", "max"}
    assert out["warmup_steps"] == 2 and out["steps"] == 3 and len(out["step_times_s"]) == 3
    # The timed steps are exactly the ones stderr reports as steps, not the warm-up ones.
    timed = [float(ms) for ms in re.findall(r"^step \d+: ([\d.]+) ms", result.stderr, re.M)]
    warm = re.findall(r"^warm-up \d+: ", result.stderr, re.M)
    assert len(warm) == 2 and timed == [round(t * 1000, 1) for t in out["step_times_s"]]
    mean = sum(out["step_times_s"]) / 3
    assert out["step_time_s"]["mean"] == pytest.approx(mean)
    assert out["tokens_per_step"] == 2 * 32 and out["tokens_per_s"] == pytest.approx(64 / mean)
    assert out["flops_per_token"]["total"] == demo_flops_by_hand(32)
    tflops = demo_flops_by_hand(32) * 64 / mean / 1e12
    assert out["tflops_per_s_per_device"] == pytest.approx(tflops)
    assert out["mfu"] == pytest.approx(tflops / 0.5)
    assert out["peak_source"] == "train.peak_tflops" and out["peak_memory_bytes"] > 0
    assert out["memory_measure"] == "process_peak_rss"  # CPU


def test_only_recipes_with_a_json_output_have_the_flag(cli):
    assert "--json" in cli("benchmark", "--help").stdout
    assert "--json" not in cli("finetune", "--help").stdout
    assert cli("finetune", "demo", "--json").exit_code == 2


def test_flops_of_llama_3_2_1b_shape_by_hand():
    """The formula on the real Llama-3.2-1B shape (bundled config, built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_cli.assets import bundled_config
    from automodel_cli.components.training.flops import flops_per_token

    config = AutoConfig.from_pretrained(bundled_config("meta-llama/Llama-3.2-1B-Instruct"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    L, h, heads, kv, d, i, V = 16, 2048, 32, 8, 64, 8192, 128256
    n_matmul = L * (h * d * (2 * heads + 2 * kv) + 3 * h * i) + h * V
    flops = flops_per_token(model, config, 2048)
    assert flops.matmul_parameters == n_matmul == 1_235_746_816
    assert flops.total == 6 * n_matmul + 12 * L * heads * d * 2048 == 8_219_787_264


def test_peak_table_matches_device_names():
    from automodel_cli.components.training.flops import lookup_peak

    assert lookup_peak("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert lookup_peak("NVIDIA H100 PCIe")[0] == 756.5
    assert lookup_peak("NVIDIA H200")[0] == 989.4
    assert lookup_peak("NVIDIA GH200 480GB")[1].startswith("table: NVIDIA GH200")
    assert lookup_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert lookup_peak("NVIDIA L40S")[0] == 362.05 and lookup_peak("NVIDIA L4")[0] == 121.0
    assert lookup_peak("NVIDIA B200")[0] == 2250.0
    assert lookup_peak("Some CPU") == (None, None)


def test_preset_runs_offline_with_random_weights_and_reports_mfu_na():
    """llama3.2-1b resolves its architecture from the bundled config: no hub access at all."""
    result = run_cli("benchmark", "llama3.2-1b", "model.config.num_hidden_layers=1", "model.config.hidden_size=64",
                     "model.config.intermediate_size=128", "model.config.num_attention_heads=2",
                     "model.config.num_key_value_heads=1", "model.config.head_dim=32",
                     "model.config.vocab_size=512", *TINY, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.stderr
    assert "meta-llama/Llama-3.2-1B-Instruct (llama" in result.stdout and "random weights" in result.stdout
    assert "MFU:             n/a" in result.stdout and "tokens/s:" in result.stdout


def test_real_text_data(cli):
    result = cli("benchmark", "demo", "benchmark.synthetic=false", "data.name=demo-text", "benchmark.json=true",
                 *TINY)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["data"] == "demo-text"
    assert 1.0 < out["final_loss"] < 5.0 and out["steps"] == 3


def test_bad_input_exit_2(cli):
    result = cli("benchmark", "demo", "benchmark.seq_len=4096", *TINY[1:])
    assert result.exit_code == 2
    assert "benchmark.seq_len=4096" in result.stderr and "max_position_embeddings=128" in result.stderr
    result = cli("benchmark", "demo", "benchmark.steps=0")
    assert result.exit_code == 2 and "`benchmark.steps` must be >= 1, got 0" in result.stderr
