"""GPU paths of `automodel finetune` (bf16 autocast, bf16 LoRA base). Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARGS = ["train.global_batch_size=32", "train.micro_batch_size=16", "train.max_steps=40",
        "train.eval_every_steps=null", "train.eval_batches=2", "logging.progress=false"]


def run_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_full_finetune_on_gpu_uses_fp32_weights_and_bf16_autocast(cli, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "gpu-full"
    result = cli("finetune", "demo", "-o", str(run), *ARGS)
    assert result.exit_code == 0, result.stderr
    assert "cuda, float32 weights, bfloat16 autocast" in result.stdout
    metrics = run_metrics(run)
    assert metrics[-1]["loss"] < metrics[0]["loss"] * 0.8
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.dtype == torch.float32


def test_lora_on_gpu_keeps_base_in_bf16(cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "gpu-lora"
    result = cli("finetune", "demo", "--peft", "lora", "-o", str(run), *ARGS)
    assert result.exit_code == 0, result.stderr
    assert "cuda, bfloat16 weights, bfloat16 autocast" in result.stdout
    metrics = run_metrics(run)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    base = AutoModelForCausalLM.from_pretrained(run / "base_model")
    PeftModel.from_pretrained(base, run / "final")
