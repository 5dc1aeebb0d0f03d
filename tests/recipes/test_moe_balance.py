"""The router balance loss through the recipes: a saved tiny Qwen3-MoE fine-tuned for two steps
logs ``aux_loss``, ``ce_loss`` and the expert load, and its loss is CE plus the coefficient
times the aux loss; a dense model ignores ``moe.*`` with a warning; ``automodel pretrain
demo-moe`` (and ``finetune demo-moe``) run and say the router's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_models import save_moe_model
from tolerances import f32_tol

TINY = ["data.name=demo", "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every_steps=null",
        "data.eval_split=null", "logging.progress=false", "model.dtype=float32"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_adds_coef_times_aux_and_logs_the_expert_load(cli, tmp_path):
    model = save_moe_model(tmp_path / "model", "qwen3_moe")  # router_aux_loss_coef=0.01
    runs = {}
    for name, extra in (("default", []), ("off", ["moe.aux_loss_coef=0"])):
        run = tmp_path / name
        result = cli("finetune", f"model.path={model}", "-o", str(run), "train.max_steps=2",
                     *TINY, *extra)
        assert result.exit_code == 0, result.stderr
        assert "router balance: 2 routers, 8 experts, top-2" in result.stdout
        runs[name] = read_metrics(run)
    first, off = runs["default"][0], runs["off"][0]
    for m in runs["default"] + runs["off"]:
        assert {"aux_loss", "ce_loss", "expert_load_max_mean", "expert_load_max_mean_layer0",
                "expert_load_max_mean_layer1"} <= set(m)
        assert 0 < m["aux_loss"] < 16 and 1 <= m["expert_load_max_mean"] <= 8
    # Step 1 runs the same weights on the same batches (two micro-batches): the same CE and aux,
    # and the default's loss is CE + 0.01 * aux (the micro-batch means, as HF computes each).
    rtol, atol = f32_tol(first["loss"], terms=4096, depth=60)
    assert first["aux_loss"] == pytest.approx(off["aux_loss"], rel=rtol, abs=atol)
    assert first["ce_loss"] == pytest.approx(off["ce_loss"], rel=rtol, abs=atol)
    assert off["loss"] == pytest.approx(off["ce_loss"], rel=rtol, abs=atol)
    assert first["loss"] - off["loss"] == pytest.approx(0.01 * first["aux_loss"], rel=1e-3, abs=atol)


def test_dense_model_ignores_moe_settings_with_a_warning(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=1", "moe.aux_loss_coef=0.1", *TINY)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("the model has no router: moe.aux_loss_coef and moe.z_loss_coef are ignored") == 1
    assert "aux_loss" not in read_metrics(run)[0] and "expert_load_max_mean" not in read_metrics(run)[0]


def test_pretrain_demo_moe_says_the_router_numbers(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("pretrain", "demo-moe", "-o", str(run), "train.max_steps=3", "train.global_batch_size=8",
                 "train.micro_batch_size=8", "train.eval_batches=1", "model.dtype=float32")
    assert result.exit_code == 0, result.stderr
    assert "router balance: 2 routers, 8 experts, top-2; aux-loss coefficient 0.01" in result.stdout
    assert "router after step 1: aux loss " in result.stdout and "expert load max/mean " in result.stdout
    step_lines = [line for line in result.stderr.splitlines() if line.startswith("step 3/3")]
    assert step_lines and " (aux " in step_lines[0] and ", load max/mean " in step_lines[0]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("expert_load_max_mean" in m for m in metrics)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "final").model_type == "qwen3_moe"


def test_finetune_demo_moe_runs(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("finetune", "demo-moe", "-o", str(run), "train.max_steps=1", *TINY)
    assert result.exit_code == 0, result.stderr
    assert "aux_loss" in read_metrics(run)[0]


@pytest.mark.parametrize("loss", ["masked_ce", "linear_ce"])
def test_distilling_into_a_moe_student_adds_its_balance_loss(cli, tmp_path, loss):
    """A mixture-of-experts student gets its router terms on top of the distillation loss, on the
    full-logits and the fused-head path alike: the loss with the default coefficient is the loss
    without plus 0.01 x aux (step 1: same weights, same batches)."""
    model = save_moe_model(tmp_path / "model", "qwen3_moe")
    teacher = save_moe_model(tmp_path / "teacher", "qwen3_moe", seed=1)
    runs = {}
    for name, extra in (("default", []), ("off", ["moe.aux_loss_coef=0"])):
        run = tmp_path / name
        result = cli("distill", f"model.path={model}", f"distill.teacher_path={teacher}", f"loss.name={loss}",
                     "-o", str(run), "train.max_steps=1", *TINY, *extra)
        assert result.exit_code == 0, result.stderr
        runs[name] = read_metrics(run)[0]
    first, off = runs["default"], runs["off"]
    assert {"aux_loss", "ce_loss", "kl", "expert_load_max_mean"} <= set(first)
    rtol, atol = f32_tol(first["loss"], terms=4096, depth=60)  # as the fine-tuning test above
    assert first["aux_loss"] == pytest.approx(off["aux_loss"], rel=rtol, abs=atol)
    assert first["kl"] == pytest.approx(off["kl"], rel=rtol, abs=atol)
    assert first["loss"] - off["loss"] == pytest.approx(0.01 * first["aux_loss"], rel=1e-3, abs=atol)


def test_benchmark_demo_moe_counts_the_active_experts(cli, tmp_path):
    """`automodel benchmark demo-moe` fits the demo's positions and its FLOPs count the routed experts."""
    result = cli("benchmark", "demo-moe", "benchmark.warmup_steps=1", "benchmark.steps=2")
    assert result.exit_code == 0, result.stderr
    assert "1 x 128 tokens per rank" in result.stdout
    assert "mixture of experts: the weights of the 2 experts a token is routed to" in result.stdout
