"""LoRA on mixture-of-experts models: which parts ``all-linear`` adapts, and the exports
(``checkpoint consolidate`` with and without ``--merge-lora``, ``convert merge-lora``) compared
with peft's own ``merge_and_unload`` / ``PeftModel.from_pretrained`` on the same adapter."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from automodel_cli.components.checkpoint import save_checkpoint
from automodel_cli.components.peft.lora import apply_peft
from automodel_cli.errors import UserError
from tests.moe_models import KINDS, save_moe_model, tiny_moe
from tolerances import assert_close_f32, decoder_rounding

INPUTS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
RANK = 4
#: float32 rounding of a tiny MoE's logits (hidden 64, experts 32 wide, top-2: two experts summed)
#: with a rank-4 adapter merged into the weights.
MERGED = decoder_rounding(layers=2, hidden=64, intermediate=2 * 32, positions=12, merged_rank=RANK)


def peft_cfg(**overrides):
    values = dict(method="lora", rank=RANK, alpha=8, dropout=0.0, target_modules="all-linear",
                  moe_experts=None, moe_router=False)
    return SimpleNamespace(**{**values, **overrides})


def trainable(model) -> set[str]:
    """The adapted parts of layer 0, as ``module.lora_X`` names without the peft prefix."""
    return {n.split("layers.0.")[1].replace(".default.weight", "") for n, p in model.named_parameters()
            if p.requires_grad and "layers.0." in n}


ATTENTION = {f"self_attn.{p}.lora_{ab}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
EXPERTS = {f"mlp.experts.{inner}lora_{ab}" for inner in ("", "base_layer.") for ab in "AB"}
ROUTER = {f"mlp.gate.lora_{ab}" for ab in "AB"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_linear_adapts_attention_and_experts_not_the_router(kind):
    said = []
    model = apply_peft(tiny_moe(kind), peft_cfg(), say=said.append)
    assert trainable(model) == ATTENTION | EXPERTS
    assert said == ["lora: adapted attention and other linear layers (8), expert projections (4)"]
    # nesting: gate_up_proj is wrapped first (innermost), down_proj around it
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")


@pytest.mark.parametrize("kind", list(KINDS))
def test_router_only_with_the_key_and_experts_can_be_left_out(kind):
    assert trainable(apply_peft(tiny_moe(kind), peft_cfg(moe_router=True))) == ATTENTION | EXPERTS | ROUTER
    assert trainable(apply_peft(tiny_moe(kind), peft_cfg(moe_experts=False))) == ATTENTION


def test_expert_parallelism_leaves_the_experts_frozen_and_refuses_explicit_expert_targets():
    said = []
    model = apply_peft(tiny_moe(), peft_cfg(), ep=2, say=said.append)
    assert trainable(model) == ATTENTION
    assert len(said) == 1 and "experts frozen: distributed.ep=2" in said[0]
    with pytest.raises(UserError, match="peft.moe_experts=true cannot be combined with distributed.ep=2"):
        apply_peft(tiny_moe(), peft_cfg(moe_experts=True), ep=2)
    with pytest.raises(UserError, match=r"names expert projections \(gate_proj, down_proj\)"):
        apply_peft(tiny_moe(), peft_cfg(target_modules=["q_proj", "gate_proj", "down_proj"]), ep=2)


def test_dropout_and_dora_are_refused_on_expert_targets_but_fine_without_them():
    with pytest.raises(UserError, match="peft.dropout=0.1 cannot be used"):
        apply_peft(tiny_moe(), peft_cfg(dropout=0.1))
    with pytest.raises(UserError, match="peft.method=dora cannot adapt"):
        apply_peft(tiny_moe(), peft_cfg(method="dora"))
    assert trainable(apply_peft(tiny_moe(), peft_cfg(dropout=0.1, moe_experts=False))) == ATTENTION


# ------------------------------------------------------------------------------ exports
@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=INPUTS).logits.float()


def keys(directory: Path) -> set[str]:
    found = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            found |= set(f.keys())
    return found


def adapted_run(tmp_path: Path, kind: str, router: bool, base_dir: Path):
    """A LoRA checkpoint of the tiny ``kind`` MoE with non-zero adapters, and the peft model."""
    from transformers import AutoModelForCausalLM

    model = apply_peft(AutoModelForCausalLM.from_pretrained(base_dir), peft_cfg(moe_router=router))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter something to merge
            torch.nn.init.normal_(param, std=0.05)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 3, model=model, optimizer=None, scheduler=None, train_state={}, keep=1)
    return run_dir, model


@pytest.mark.parametrize("router", [False, True], ids=["experts", "experts+router"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_exports_match_peft_merge_and_unload(cli, tmp_path, kind, router):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_moe_model(tmp_path / "base", kind)
    run_dir, model = adapted_run(tmp_path, kind, router, base_dir)
    expected = logits(model.merge_and_unload())
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(base_dir)), expected, atol=1e-3)

    merged = tmp_path / "merged"
    result = cli("checkpoint", "consolidate", str(run_dir), "--out", str(merged), "--merge-lora",
                 "--base-model", str(base_dir))
    assert result.exit_code == 0, result.stderr
    assert keys(merged) == keys(base_dir)  # the base's own per-expert format
    assert_close_f32(logits(AutoModelForCausalLM.from_pretrained(merged)), expected, **MERGED)

    adapter = tmp_path / "adapter"
    result = cli("checkpoint", "consolidate", str(run_dir), "--out", str(adapter))
    assert result.exit_code == 0, result.stderr
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert_close_f32(logits(loaded), logits(model), **MERGED)

    converted = tmp_path / "converted"
    result = cli("convert", "merge-lora", str(adapter), "--base", str(base_dir), "--out", str(converted))
    assert result.exit_code == 0, result.stderr
    assert keys(converted) == keys(base_dir)
    assert_close_f32(logits(AutoModelForCausalLM.from_pretrained(converted)), expected, **MERGED)


def test_merge_into_a_fused_base_stays_fused(cli, tmp_path):
    """A base stored with the fused expert tensors (the model's own layout) is merged fused."""
    from transformers import AutoModelForCausalLM

    per_expert = save_moe_model(tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    base = AutoModelForCausalLM.from_pretrained(per_expert)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    run_dir, model = adapted_run(tmp_path, "qwen3_moe", False, per_expert)
    expected = logits(model.merge_and_unload())

    merged = tmp_path / "merged"
    result = cli("checkpoint", "consolidate", str(run_dir), "--out", str(merged), "--merge-lora",
                 "--base-model", str(fused))
    assert result.exit_code == 0, result.stderr
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys(merged) == keys(fused)
    assert_close_f32(logits(AutoModelForCausalLM.from_pretrained(merged)), expected, **MERGED)


def test_adapter_config_records_the_explicit_targets(cli, tmp_path):
    base_dir = save_moe_model(tmp_path / "base")
    run_dir, _ = adapted_run(tmp_path, "qwen3_moe", False, base_dir)
    adapter = tmp_path / "adapter"
    assert cli("checkpoint", "consolidate", str(run_dir), "--out", str(adapter)).exit_code == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
