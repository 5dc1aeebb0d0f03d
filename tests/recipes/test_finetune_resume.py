"""Exact resume: a run killed with SIGKILL, or stopped with SIGTERM, and resumed with
checkpoint.resume=auto produces exactly the per-step losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 16
ARGS = ["finetune", "demo", f"train.max_steps={STEPS}", "train.global_batch_size=64",
        "train.micro_batch_size=16", "train.eval_every_steps=null", "data.eval_split=null",
        "checkpoint.every_steps=2", "checkpoint.keep=2", "logging.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU, same kernels every run: bitwise-equal losses


def start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "automodel_cli", *ARGS, "-o", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines)]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, float]]:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = start(run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return losses(run)


def test_sigkill_then_resume_matches_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "killed"
    proc = start(run)
    wait_for_step(run, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").exists()
    assert not (run / "final").exists()
    resumed = start(run, "checkpoint.resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    assert losses(run) == reference  # every step, bitwise
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]


def test_sigterm_saves_a_checkpoint_and_resume_matches(reference, tmp_path):
    run = tmp_path / "terminated"
    proc = start(run)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = len(losses(run))
    assert stopped_at < STEPS
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"
    assert "checkpoint.resume=auto" in out
    resumed = start(run, "checkpoint.resume=auto")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert losses(run) == reference
