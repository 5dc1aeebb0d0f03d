"""`automodel finetune` when the disk refuses a write, or the newest checkpoint is damaged:
exit code 2 with what happened and what to run next, the checkpoints byte-identical, and
`checkpoint.resume=auto` continuing from the intact checkpoint.

The file-size limit (RLIMIT_FSIZE, set for the child only) makes writes past 200 KB fail with
a real EFBIG on any Linux machine; a full disk (ENOSPC) takes the same path and is tested
on a real tmpfs in tests/components/checkpoint/test_checkpoint_disk_errors.py.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_digest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
LIMIT = 200_000  # bytes: below a checkpoint shard and final/model.safetensors (1.5 MB), above the logs


def finetune(run: Path, data: Path, *extra: str, file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(
        [sys.executable, "-m", "automodel_cli", "finetune", "demo", "data.name=instruction", f"data.path={data}",
         "data.eval_split=null", "train.global_batch_size=4", "train.micro_batch_size=4", "logging.progress=false",
         "checkpoint.keep=3", "-o", str(run), *extra],
        capture_output=True, text=True, env=ENV, timeout=600, preexec_fn=limit if file_limit else None)



def expect_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-4000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"reverse: abc{i}", "completion": "cba"}) + "\n" for i in range(16)))
    return path


def test_refused_writes_keep_the_checkpoint_and_resume_continues_from_it(tmp_path, data):
    run = tmp_path / "run"
    first = finetune(run, data, "train.max_steps=2", "checkpoint.every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {"checkpoints": tree_digest(run / "checkpoints"), "final": tree_digest(run / "final")}

    # A checkpoint save (step 4) the disk refuses.
    refused = finetune(run, data, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.resume=auto",
                       file_limit=LIMIT)
    expect_user_error(refused, "error: Could not save checkpoint step_00000004", "ulimit -f",
                      "The unfinished checkpoint was removed; the previous checkpoint, step_00000002, is intact",
                      f"continue from step_00000002 with `checkpoint.resume=auto --output-dir {run}`")
    assert {"checkpoints": tree_digest(run / "checkpoints"), "final": tree_digest(run / "final")} == kept

    # Writing final/ the disk refuses (no checkpoint is due before the end of this run).
    refused = finetune(run, data, "train.max_steps=3", "checkpoint.every_steps=null", "checkpoint.resume=auto",
                       file_limit=LIMIT)
    expect_user_error(refused, f"error: Could not write the final model to {run / 'final'}",
                      "The partial copy was removed and final/ was left as it was",
                      "The run's checkpoints are intact (the latest is step_00000002)",
                      f"`checkpoint.resume=auto --output-dir {run}`: it continues from step_00000002")
    assert {"checkpoints": tree_digest(run / "checkpoints"), "final": tree_digest(run / "final")} == kept
    assert not (run / ".final.tmp").exists()

    # With room again, the run continues from the kept checkpoint.
    resumed = finetune(run, data, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_damaged_latest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, data):
    run = tmp_path / "run"
    first = finetune(run, data, "train.max_steps=2", "checkpoint.every_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    latest_shard = run / "checkpoints" / "step_00000002" / "model" / "__0_0.distcp"
    latest_shard.write_bytes(latest_shard.read_bytes()[:1000])
    older_shard = run / "checkpoints" / "step_00000001" / "optim" / "__0_0.distcp"
    older_bytes = older_shard.read_bytes()

    # Named by path: refused, nothing changed.
    before = tree_digest(run)
    named = finetune(run, data, "train.max_steps=3", f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")
    expect_user_error(named, f"Checkpoint file {latest_shard} is corrupted or truncated (1000 bytes, expected")
    assert tree_digest(run) == before

    # Every checkpoint damaged: a clear error, nothing changed, no advice to set what is set.
    older_shard.write_bytes(older_bytes[:1000])
    before = tree_digest(run)
    nothing = finetune(run, data, "train.max_steps=3", "checkpoint.resume=auto")
    expect_user_error(nothing, "checkpoint.resume=auto found no intact checkpoint",
                      "step_00000002 is damaged", "step_00000001 is damaged")
    assert "Set checkpoint.resume to auto" not in nothing.stderr
    assert tree_digest(run) == before

    # The older one intact again: auto resumes from it and says why in one line.
    older_shard.write_bytes(older_bytes)
    resumed = finetune(run, data, "train.max_steps=3", "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stdout.splitlines() if line.startswith("checkpoint.resume=auto:")]
    assert len(notes) == 1 and "step_00000002 is damaged" in notes[0] and "resuming from step_00000001" in notes[0]
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1" in resumed.stdout
