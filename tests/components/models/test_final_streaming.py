"""final/ is written one tensor at a time (``save_final`` with ``hf_stream``) and holds exactly
what it held when the whole model was gathered on rank 0 and written with ``save_pretrained``:
the same keys (a tied weight once), bitwise equal tensors, the same config and generation config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _final_worker import SCENARIOS, compare  # also puts tests/components/distributed on sys.path

WORKER = Path(__file__).with_name("_final_worker.py")


def assert_same_as_before(result: dict) -> None:
    """Every tensor written before is written now, bitwise equal, except a second name of a tied
    weight (equal to the first)."""
    assert result["extra"] == [] and result["unequal"] == [] and result["dropped_aliases_equal"], result
    assert result["config_equal"] and result["generation_config_equal"] and result["tokenizer"]
    # Rank 0 held at most one gathered tensor at a time.
    assert 0 < result["peak_bytes"] <= result["largest_bytes"], result


def tiny_gemma3_multimodal():
    """Gemma 3 with a vision tower: its weight conversions (renamed prefixes) are reverted on save."""
    from test_structure import tiny_gemma3_multimodal as build

    return build()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_final_in_one_process_is_what_save_pretrained_writes(tmp_path, arch):
    import torch

    from _dist_worker import make_model

    torch.manual_seed(0)
    model = tiny_gemma3_multimodal() if arch == "gemma3" else make_model(arch)
    result = compare(model, tmp_path, distributed=False)
    assert_same_as_before(result)
    assert result["missing"] == []
    if arch == "qwen3":  # tied embeddings: stored once, as save_pretrained does
        assert "lm_head.weight" not in result["keys"] and "model.embed_tokens.weight" in result["keys"]
    if arch == "gemma3":  # the checkpoint format, not the module names
        assert any(k.startswith("language_model.") for k in result["keys"]), result["keys"][:5]


@pytest.mark.slow
def test_final_on_two_ranks_is_gathered_one_tensor_at_a_time(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(out), str(tmp_path), *SCENARIOS],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    for name, result in results.items():
        assert_same_as_before(result)
        assert result["total_bytes"] >= 8 * result["largest_bytes"], name  # so the bound above means something
    # Before, a tied weight gathered on rank 0 was written twice (the gathered copies no longer
    # shared storage); now it is written once, like save_pretrained in one process.
    assert results["fsdp"]["missing"] == results["tp"]["missing"] == []
    tied = results["fsdp_qwen3_tied"]
    assert tied["missing"] == ["lm_head.weight"] and "model.embed_tokens.weight" in tied["keys"]


def test_sharded_final_has_the_files_and_index_of_save_pretrained(tmp_path):
    """Over the shard size the weights are split into the files save_pretrained names, each key
    in the same file, with model.safetensors.index.json mapping them."""
    import torch
    from safetensors.torch import load_file

    from _dist_worker import make_model
    from automodel_cli.components.models import hf_stream

    torch.manual_seed(0)
    model = make_model("llama")
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = 2 * largest
    model.save_pretrained(tmp_path / "hf", max_shard_size=limit)
    (tmp_path / "ours").mkdir()
    files = hf_stream.write_weights(model, tmp_path / "ours", max_shard_bytes=limit)

    expected = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(files) == sorted(set(expected["weight_map"].values()))
    assert index["weight_map"] == expected["weight_map"]
    assert index["metadata"]["total_size"] == expected["metadata"]["total_size"]
    for name in files:
        ours, theirs = load_file(tmp_path / "ours" / name), load_file(tmp_path / "hf" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
