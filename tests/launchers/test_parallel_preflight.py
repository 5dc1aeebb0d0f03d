"""Tensor- and expert-parallel settings the model's config.json rules out are refused before
torchrun starts: one paragraph, exit 2, no traceback, no run directory."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from automodel_cli.components.launch.preflight import parallel_problems
from tests.moe_models import tiny_moe_config


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def moe_dir(path: Path, kind: str = "qwen3_moe", **overrides) -> Path:
    path.mkdir()
    tiny_moe_config(kind, **overrides).to_json_file(path / "config.json")
    return path


def refused_before_launch(result, *phrases):
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert not Path("runs").exists(), "a refused launch created a run directory"


def test_tp_not_dividing_the_heads_is_refused_before_torchrun(cli, workdir):
    model = moe_dir(workdir / "moe", num_attention_heads=3, num_key_value_heads=3)
    refused_before_launch(cli("finetune", "demo", "--nproc-per-node", "2", "-o", "runs/x", f"model.path={model}",
                              "distributed.tp=2"),
                          "command line `distributed.tp=2`", "num_attention_heads=3, num_key_value_heads=3")


def test_tp_on_a_model_type_without_a_plan_is_refused_before_torchrun(cli, workdir):
    model = moe_dir(workdir / "olmoe", "qwen3_moe")
    (model / "config.json").write_text((model / "config.json").read_text().replace('"qwen3_moe"', '"olmoe"'))
    refused_before_launch(cli("finetune", "demo", "--nproc-per-node", "2", "-o", "runs/x", f"model.path={model}",
                              "distributed.tp=2"), "none is registered for model type `olmoe`")


def test_the_moe_intermediate_size_is_not_required_to_divide(cli, workdir):
    from automodel_cli.components.distributed.plans import tp_problems

    config = tiny_moe_config("qwen3_moe", intermediate_size=127, moe_intermediate_size=31)
    assert tp_problems(config, 2) == []
    assert tp_problems(tiny_moe_config("qwen3_moe", intermediate_size=127, mlp_only_layers=[0]), 2) == \
        ["intermediate_size=127"]


class Config(dict):
    """The resolved config as preflight reads it (dotted ``get``)."""

    def get(self, dotted, default=None):
        return super().get(dotted, default)


@pytest.mark.parametrize("kind, overrides, ep, dp_shard, peft, phrases", [
    ("llama", {}, 2, 2, {}, ["has no experts", "Set distributed.ep=1"]),
    ("qwen3_moe", {"num_experts": 6}, 4, 4, {}, ["must divide the number of experts", "has 6", "Choose distributed.ep from 1, 2, 3, 6"]),
    ("qwen3_moe", {}, 2, 3, {}, ["must divide distributed.dp_shard=3"]),
    ("qwen3_moe", {}, 2, 2, {"peft.method": "lora", "peft.moe_experts": True}, ["peft.moe_experts=true"]),
    ("mixtral", {}, 2, 2, {"peft.method": "lora", "peft.target_modules": ["q_proj", "w1"]}, ["names w1"]),
])
def test_expert_parallel_settings_are_refused(workdir, kind, overrides, ep, dp_shard, peft, phrases):
    if kind == "llama":
        path = workdir / "dense"
        path.mkdir()
        from transformers import LlamaConfig

        LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64).to_json_file(path / "config.json")
    else:
        path = moe_dir(workdir / "moe", kind, **overrides)
    cfg = Config({"model.path": str(path), "distributed.tp": 1, "distributed.ep": ep, **peft})
    found = parallel_problems(cfg, SimpleNamespace(mesh=SimpleNamespace(dp_shard=dp_shard)), None)
    assert len(found) == 1, found
    for phrase in phrases:
        assert phrase in found[0][1]


def test_fitting_settings_and_unknown_models_pass(workdir):
    path = moe_dir(workdir / "moe")
    ok = Config({"model.path": str(path), "distributed.tp": 2, "distributed.ep": 2, "peft.method": "lora"})
    assert parallel_problems(ok, SimpleNamespace(mesh=SimpleNamespace(dp_shard=2)), ["qwen3_moe"]) == []
    hub = Config({"model.path": "acme/not-cached", "distributed.tp": 2})
    assert parallel_problems(hub, SimpleNamespace(mesh=None), ["qwen3_moe"]) == []
