"""`distributed.auto=true` in a real run: `automodel finetune demo --nproc-per-node 2` chooses
the layout once, before torchrun, and the two gloo processes train with it.

The demo model's layouts are all compute-bound on CPU; the tie goes to plain FSDP
(dp_shard=2), 32 / 2 = 16 sequences per rank in one micro-batch. The test reads the choice from
the printed `applied:` line and checks it against the config the run saved and the frozen config
its processes read; the table is printed once (the processes do not choose again).
"""

from __future__ import annotations

import pytest
import yaml

from automodel_cli.components.logging import read_metrics
from conftest import run_cli

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
KEYS = ("distributed.pp", "distributed.dp_replicate", "distributed.dp_shard", "distributed.cp", "distributed.tp",
        "distributed.ep", "train.micro_batch_size", "train.activation_checkpointing")


def dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_an_automatic_layout_runs_with_the_values_it_chose(tmp_path):
    run = tmp_path / "run"
    result = run_cli("finetune", "demo", "-o", str(run), "--nproc-per-node", "2", "distributed.auto=true",
                     "launch.device_memory_gib=8", "train.max_steps=2", "train.eval_every_steps=null",
                     "logging.progress=false", env=ENV, timeout=600)
    assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("automatic layout (distributed.auto=true)") == 1
    assert "Chosen: dp_shard=2, micro-batch 16 x 1 per step" in result.stdout
    applied = next(line for line in result.stdout.splitlines() if line.startswith("applied: "))
    chosen = dict(item.split("=", 1) for item in applied.removeprefix("applied: ").split())
    assert set(chosen) == set(KEYS)
    for path in (run / "config.yaml", run / "launch" / "config.yaml"):
        saved = yaml.safe_load(path.read_text())
        assert {key: str(dotted(saved, key)) for key in KEYS} == chosen, path
        assert saved["train"]["global_batch_size"] == 32
    assert [step["step"] for step in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert "dp_shard=2" in result.stdout  # the run's own mesh line
