"""`automodel finetune --nproc-per-node N`: real multi-process runs (torchrun, gloo on CPU).

The same config on 1 or N processes trains on the same samples per step, so per-step losses
agree: FSDP2, tensor parallel, FSDP x TP and LoRA under FSDP2, 10 steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false",
          "model.dtype=float32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo by design


def finetune(run: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "automodel_cli", "finetune", "demo", "-o", str(run),
                           *COMMON, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, list[float]]:
    """Reference losses of one process, full fine-tuning and LoRA."""
    out = {}
    for method in ("none", "lora"):
        run = tmp_path_factory.mktemp("single") / method
        result = finetune(run, "--peft", method)
        assert result.returncode == 0, result.stderr
        out[method] = losses(run)
    return out


@pytest.mark.parametrize("name, nproc, extra, method", [
    ("fsdp2", 2, [], "none"),
    ("tp2", 2, ["distributed.tp=2"], "none"),
    ("fsdp2xtp2", 4, ["distributed.tp=2"], "none"),
    ("lora-fsdp2", 2, [], "lora"),
])
def test_parallel_losses_match_one_process(single, tmp_path, name, nproc, extra, method):
    run = tmp_path / name
    result = finetune(run, "--nproc-per-node", str(nproc), "--peft", method, *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    got = losses(run)
    assert len(got) == STEPS
    assert got == pytest.approx(single[method], abs=1e-4)
    assert (run / "final").is_dir()
    assert "data-parallel rank(s)" in result.stdout


def test_fsdp2_final_model_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    import torch

    run = tmp_path / "fsdp-final"
    result = finetune(run, "--nproc-per-node", "2", "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-4000:]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "2", "distributed.tp=4"], "does not fit 2 process(es)"),
    (["--nproc-per-node", "2", "distributed.dp_shard=4"], "multiply to 4 processes"),
    (["--nproc-per-node", "4", "distributed.tp=4"], "must divide the model's num_key_value_heads=2"),
])
def test_bad_mesh_is_a_clear_error(tmp_path, args, message):
    result = finetune(tmp_path / "bad", *args, "train.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr


def test_save_on_two_ranks_resume_on_one_matches(single, tmp_path):
    run = tmp_path / "reshard"
    first = finetune(run, "--nproc-per-node", "2", "checkpoint.every_steps=4", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = finetune(run, "checkpoint.resume=auto", "checkpoint.every_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    assert losses(run) == pytest.approx(single["none"], abs=1e-4)


def test_consolidate_sharded_checkpoint_to_hf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import run_cli

    run = tmp_path / "sharded"
    result = finetune(run, "--nproc-per-node", "2", "checkpoint.every_steps=2", "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "hf"
    consolidated = run_cli("checkpoint", "consolidate", str(run), "--out", str(out))
    assert consolidated.exit_code == 0, consolidated.stderr
    inputs = torch.tensor([[1, 10, 11, 12, 13]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(run / "final")(inputs).logits
        got = AutoModelForCausalLM.from_pretrained(out)(inputs).logits
    assert torch.equal(got, expected)
    inspect = run_cli("checkpoint", "inspect", str(run))
    assert inspect.exit_code == 0 and "world size   2" in inspect.stdout
