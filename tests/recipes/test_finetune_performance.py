"""`automodel finetune` with the performance options: fused/chunked losses give the step losses
of masked_ce, torch.compile and every activation-checkpointing mode run and keep the math, and
the run reports its padding."""

from __future__ import annotations

import json

import pytest

from test_finetune import TINY, read_metrics

# Step losses of three-step runs are trajectories: each step carries the rounding differences of the
# last, so they are compared relatively (1e-5, about 80 float32 ulps; 1e-4 where torch.compile's
# decompositions or another process count reorder every reduction).


def step_losses(cli, run, *args):
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=3", *TINY, *args)
    assert result.exit_code == 0, result.stderr
    return [m["loss"] for m in read_metrics(run)], result


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_linear_ce_and_chunked_ce_give_the_step_losses_of_masked_ce(cli, tmp_path, peft):
    reference, _ = step_losses(cli, tmp_path / "masked", "--peft", peft)
    assert len(set(reference)) == 3  # training moves: equal losses below are not trivially equal
    for name, chunk in (("linear_ce", "null"), ("linear_ce", "7"), ("chunked_ce", "5")):
        losses, _ = step_losses(cli, tmp_path / f"{name}-{chunk}", "--peft", peft,
                                f"loss.name={name}", f"loss.{name}.chunk_size={chunk}")
        assert losses == pytest.approx(reference, rel=1e-5), (name, chunk)


def test_packed_run_with_linear_ce(cli, tmp_path):
    reference, _ = step_losses(cli, tmp_path / "masked", "data.packing=true")
    losses, _ = step_losses(cli, tmp_path / "linear", "data.packing=true", "loss.name=linear_ce")
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "selective", "none"])
def test_activation_checkpointing_modes_keep_the_losses(cli, tmp_path, mode):
    reference, _ = step_losses(cli, tmp_path / "plain", "train.activation_checkpointing=false")
    losses, _ = step_losses(cli, tmp_path / mode, f"train.activation_checkpointing={mode}", "--peft", "none")
    assert losses == pytest.approx(reference, rel=1e-5)


def test_compile_per_layer_runs_and_keeps_the_losses(cli, tmp_path):
    # aot_eager traces every layer with dynamo + AOTAutograd (what inductor compiles) without
    # invoking a C++ compiler, which keeps the test fast on CPU.
    reference, _ = step_losses(cli, tmp_path / "eager")
    losses, _ = step_losses(cli, tmp_path / "compiled", "train.compile=true", "train.compile_backend=aot_eager",
                            "train.activation_checkpointing=selective", "loss.name=linear_ce")
    assert losses == pytest.approx(reference, rel=1e-4)


def test_padding_fraction_is_reported_and_lower_with_packing(cli, tmp_path):
    fractions = {}
    for packing in ("false", "true"):
        run = tmp_path / f"packing-{packing}"
        _, result = step_losses(cli, run, f"data.packing={packing}", "data.max_length=256", "train.max_steps=4")
        summary = json.loads((run / "summary.json").read_text())
        padding = summary["padding"]
        assert summary["padding_fraction"] == pytest.approx(padding["fraction"], abs=1e-6)
        assert padding["slots"] == padding["tokens"] + padding["padded"] and padding["tokens"] > 0
        assert f"padding: {summary['padding_fraction']:.1%} of the {padding['slots']} token positions" in result.stdout
        metrics = read_metrics(run)
        assert all(0 <= m["padding_fraction"] < 1 for m in metrics)
        fractions[packing] = summary["padding_fraction"]
    assert fractions["false"] > 0.02  # the demo's samples vary in length
    assert fractions["true"] < fractions["false"] / 2


@pytest.mark.parametrize("name, extra", [
    # FSDP2: the fused head runs inside the root module's forward, where the gathered weights live
    ("fsdp2", ["train.activation_checkpointing=selective", "train.compile=true", "train.compile_backend=aot_eager"]),
    # tensor parallel: the head's weight is a DTensor, so the loss falls back to full logits
    ("tp2", ["distributed.tp=2"]),
])
def test_linear_ce_on_two_processes_matches_one_process_masked_ce(cli, tmp_path, name, extra):
    import os
    import subprocess
    import sys

    reference, _ = step_losses(cli, tmp_path / "single", "train.micro_batch_size=2")
    run = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "automodel_cli", "finetune", "demo", "-o", str(run),
                             "--nproc-per-node", "2", "train.max_steps=3", *TINY, "train.micro_batch_size=2",
                             "loss.name=linear_ce", *extra], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert [m["loss"] for m in read_metrics(run)] == pytest.approx(reference, rel=1e-4)
