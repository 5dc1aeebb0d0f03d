"""`automodel finetune --peft qlora --nproc-per-node 2`: the quantized base sharded by FSDP2 over
two gloo processes trains as one process does.

FSDP2 cuts each frozen NF4 (or int8) weight into row shards and gathers it whole for its layer,
so both runs compute with the same quantized weights; only the order of the gradient sums
differs. Per-step losses and gradient norms (of the adapters: the base has no gradient) and the
saved adapter agree to 1e-4 relative: a training curve, where each optimizer step carries the
last one's rounding forward (tests/tolerances.py). A run resumed on two processes repeats the
uninterrupted one bit for bit (the same code on the same inputs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")

from model_dirs import save_sharded_model  # noqa: E402

pytestmark = pytest.mark.slow

CURVE = 1e-4  # relative agreement of losses, gradient norms and adapters after 5 steps
COMMON = ["--peft", "qlora", "train.global_batch_size=8", "train.micro_batch_size=2", "model.dtype=float32",
          "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo by design
#: A pretrained base read from safetensors: its down projection (64 x 96) does not split into
#: whole NF4 scale blocks over two processes and stays whole on each.
PRETRAINED = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


def qlora_run(run: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "automodel_cli", "finetune", "demo", "-o", str(run),
                             "--nproc-per-node", str(nproc), *COMMON, *args],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def steps(run: Path) -> dict[int, tuple[float, float]]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in rows if "loss" in row}


def adapter(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


@pytest.mark.parametrize("quantization, source", [("nf4", "seeded"), ("nf4", "pretrained"), ("int8", "seeded")])
def test_two_processes_train_as_one(tmp_path, quantization, source):
    import torch

    args = [f"peft.quantization={quantization}", "train.max_steps=5"]
    if source == "pretrained":
        base = save_sharded_model(tmp_path / "base", shards=2, **PRETRAINED)
        args += [f"model.path={base}", "model.from_scratch=false"]
    qlora_run(tmp_path / "one", 1, *args)
    result = qlora_run(tmp_path / "two", 2, *args)
    assert "data-parallel rank(s)" in result.stdout
    if source == "pretrained":
        assert "read shard by shard" in result.stdout
        assert "note: qlora: 2 quantized weights (shapes (64, 96))" in result.stdout

    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert sorted(two) == list(range(1, 6))
    for step, (loss, grad_norm) in one.items():
        assert two[step] == pytest.approx((loss, grad_norm), rel=CURVE), step
    expected, got = adapter(tmp_path / "one" / "final"), adapter(tmp_path / "two" / "final")
    assert got.keys() == expected.keys() and any("lora_B" in key for key in got)
    for key, value in expected.items():
        assert value.abs().max() > 0, key  # trained (lora_B starts at zero)
        torch.testing.assert_close(got[key], value, rtol=0, atol=CURVE * float(value.abs().max()), msg=key)
    assert json.loads((tmp_path / "two" / "final" / "quantization.json").read_text())["method"] == quantization


def test_a_run_resumed_on_two_processes_repeats_the_uninterrupted_one(tmp_path):
    import torch

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    qlora_run(straight, 2, "train.max_steps=4", "checkpoint.every_steps=2")
    result = qlora_run(resumed, 2, "train.max_steps=4",
                       f"checkpoint.resume={straight / 'checkpoints' / 'step_00000002'}")
    assert "resumed from" in result.stdout
    assert steps(resumed) == {step: row for step, row in steps(straight).items() if step > 2}
    expected, got = adapter(straight / "final"), adapter(resumed / "final")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], value) for key, value in expected.items())
