"""The model built on the meta device, each process's shards read from the safetensors files.

A random Llama saved as three safetensors shards is fine-tuned on 1, 2 and 4 processes (FSDP2,
and FSDP x TP on 4) the new way, and on one process the old way (``model.meta_init=false``: the
whole model loaded, then sharded). All give the same step-1 loss (within 1e-5) and the same
losses over 5 steps (within 1e-4: each step feeds the last one's float32 rounding differences of
the other summation order forward). Every run reports the parameter bytes the largest process
allocated: with sharded loading a process never allocates the full parameter set; on the old
path every process does. LoRA on a sharded base: the adapter in ``final/`` and the merged model
``checkpoint consolidate --merge-lora`` writes give the logits of the model trained on one
process.

The model here has 24M parameters so the suite stays fast; ``benchmarks/load_memory.py`` runs the
same comparison on a 300M model and measures each process's peak memory while loading.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model_dirs import save_sharded_model, write_prompts

pytestmark = pytest.mark.slow

ARCHITECTURE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
STEPS = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    model = save_sharded_model(root / "model", shards=3, **ARCHITECTURE)
    assert len(list(model.glob("*.safetensors"))) >= 2
    return model, write_prompts(root / "train.jsonl", 16)


def finetune(sources: tuple[Path, Path], run: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    model, data = sources
    command = [sys.executable, "-m", "automodel_cli", "finetune", f"model.path={model}", f"data.path={data}",
               f"train.max_steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=1",
               "train.eval_every_steps=null", "logging.progress=false", "model.dtype=float32", "-o", str(run)]
    if nproc > 1:
        command += ["--nproc-per-node", str(nproc)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def parameter_bytes(stdout: str) -> tuple[int, int]:
    """(bytes the largest process allocated for parameters, the model's parameter bytes) from
    the run's ``weights:`` line."""
    found = re.search(r"parameters per process: ([\d.]+) (\w+) of ([\d.]+) (\w+)", stdout)
    assert found, stdout[-2000:]
    local, local_unit, total, total_unit = found.groups()
    return int(float(local) * UNITS[local_unit]), int(float(total) * UNITS[total_unit])


@pytest.fixture(scope="module")
def whole_load(sources, tmp_path_factory) -> tuple[list[float], str]:
    """The reference: one process, the whole model loaded the old way."""
    run = tmp_path_factory.mktemp("whole") / "run"
    result = finetune(sources, run, 1, "model.meta_init=false")
    return losses(run), result.stdout


def test_the_old_path_allocates_the_whole_model(whole_load):
    _, stdout = whole_load
    assert "loaded whole in every process" in stdout
    local, total = parameter_bytes(stdout)
    assert local == total and total > 80 * 2**20


@pytest.mark.parametrize("name, nproc, extra", [
    ("one-process", 1, []),
    ("fsdp2", 2, []),
    ("fsdp4", 4, []),
    ("fsdp2xtp2", 4, ["distributed.tp=2"]),
])
def test_sharded_loading_trains_like_the_whole_model(sources, whole_load, tmp_path, name, nproc, extra):
    reference, _ = whole_load
    result = finetune(sources, tmp_path / name, nproc, *extra)
    got = losses(tmp_path / name)
    assert len(got) == STEPS
    assert got[0] == pytest.approx(reference[0], abs=1e-5)
    assert got == pytest.approx(reference, abs=1e-4)
    assert "read shard by shard from 3 safetensors files" in result.stdout
    local, total = parameter_bytes(result.stdout)
    # Each process allocates its 1/nproc of every parameter (FSDP2 pads dim 0 to a multiple of
    # the shard count: a few rows at most); the 1-decimal report rounds by under 0.1%.
    assert local <= total / nproc * 1.02 + 2**20


def test_lora_on_a_sharded_base(sources, tmp_path):
    """LoRA adapters are created after the base is sharded, seeded by name: 2 processes train
    like one, and both outputs load with the plain libraries and give the trained logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, _ = sources
    single = finetune(sources, tmp_path / "one", 1, "--peft", "lora", "train.max_steps=3")
    sharded = finetune(sources, tmp_path / "two", 2, "--peft", "lora", "train.max_steps=3",
                       "checkpoint.every_steps=3")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert single.returncode == sharded.returncode == 0
    merged = tmp_path / "merged"
    consolidate = subprocess.run([sys.executable, "-m", "automodel_cli", "checkpoint", "consolidate",
                                  str(tmp_path / "two"), "--out", str(merged), "--merge-lora"],
                                 capture_output=True, text=True, env=ENV, timeout=600)
    assert consolidate.returncode == 0, consolidate.stderr[-3000:]

    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])

    def adapter_logits(run: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, run / "final").eval()(tokens).logits

    expected = adapter_logits(tmp_path / "one")
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(tokens).logits
    magnitude = expected.abs().max().item()
    # Three optimizer steps on one process and on two differ by float32 summation order only.
    torch.testing.assert_close(adapter_logits(tmp_path / "two"), expected, rtol=0, atol=1e-4 * magnitude)
    torch.testing.assert_close(merged_logits, expected, rtol=0, atol=1e-4 * magnitude)
