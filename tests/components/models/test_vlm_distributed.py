"""FSDP2 shards a vision-language model's vision tower and language model: a tiny Qwen2-VL built
with ``build_model`` (meta device, each rank reads its shards) and trained on images and text
over 2 processes (gloo) follows the single-process run step by step; so does tensor parallelism
over 2 processes (the language model sharded by the qwen2_vl plan, the vision tower replicated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vlm_models import save_vlm

WORKER = Path(__file__).with_name("_vlm_dist_worker.py")


def launch(nproc: int, model_dir: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(WORKER), str(out), str(model_dir), *extra], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun exited {proc.returncode}:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_a_vlm_as_one_process(tmp_path):
    model_dir = save_vlm(tmp_path / "qwen2_vl", "qwen2_vl")
    one = launch(1, model_dir, tmp_path / "one.json")
    two = launch(2, model_dir, tmp_path / "two.json")
    # every vision block and decoder layer is its own FSDP unit, plus the root
    assert sorted(two["units"]) == sorted(["FSDPQwen2VLVisionBlock"] * 2 + ["FSDPQwen2VLDecoderLayer"] * 2
                                          + ["FSDPQwen2VLForConditionalGeneration"]), two["units"]
    assert one["units"] == []
    assert len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one["losses"], two["losses"])
    for a, b in zip(one["grad_norms"], two["grad_norms"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one["grad_norms"], two["grad_norms"])


@pytest.mark.slow
def test_tensor_parallel_vlm_trains_as_one_process(tmp_path):
    model_dir = save_vlm(tmp_path / "qwen2_vl", "qwen2_vl")
    one = launch(1, model_dir, tmp_path / "one.json")
    tp = launch(2, model_dir, tmp_path / "tp.json", "tp")
    for a, b in zip(one["losses"] + one["grad_norms"], tp["losses"] + tp["grad_norms"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, tp)
