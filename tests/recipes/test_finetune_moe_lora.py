"""LoRA on a mixture-of-experts model through the recipe: `automodel finetune --peft lora` on a
tiny Qwen3-MoE adapts attention and the experts (peft's parameter adapters, nested on the experts
module), from pretrained weights and from a random start, and `checkpoint consolidate
--merge-lora` of the run's checkpoint gives the logits of peft's own merge of its final adapter."""

from __future__ import annotations

import pytest
import torch

from moe_models import save_moe_model
from tolerances import assert_close_f32

COMMON = ("train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4", "checkpoint.every_steps=2",
          "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false", "model.dtype=float32",
          "optim.lr=1e-2")


@pytest.mark.parametrize("start", ["pretrained", "random"])
def test_lora_on_experts_trains_and_merges_like_peft(cli, tmp_path, start):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_moe_model(tmp_path / "model", "qwen3_moe")
    run = tmp_path / "run"
    result = cli("finetune", "demo", f"model.path={model_dir}", "--peft", "lora", "-o", str(run), *COMMON,
                 f"model.from_scratch={'true' if start == 'random' else 'false'}")
    assert result.exit_code == 0, result.stderr
    assert "lora: adapted attention and other linear layers (8), expert projections (4)" in result.stdout

    merged_dir = tmp_path / "merged"
    result = cli("checkpoint", "consolidate", str(run), "--out", str(merged_dir), "--merge-lora")
    assert result.exit_code == 0, result.stderr
    base_dir = run / "base_model" if start == "random" else model_dir  # a random base is saved with the run
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "final")
    reference = reference.merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokens = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(tokens).logits, merged(tokens).logits
    assert not torch.equal(expected, AutoModelForCausalLM.from_pretrained(base_dir).eval()(tokens).logits)
    assert_close_f32(got, expected, terms=2 * (64 + 16 + 64 + 32) + 64, depth=12)
