"""Exact resume: a run killed with SIGKILL, or stopped with SIGTERM, and resumed with
checkpoint.resume=auto produces exactly the per-step losses of an uninterrupted run; also with
checkpoint.async=true, killed while a checkpoint is being written in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

STEPS = 16
ARGS = ["finetune", "demo", f"train.max_steps={STEPS}", "train.global_batch_size=64",
        "train.micro_batch_size=16", "train.eval_every_steps=null", "data.eval_split=null",
        "checkpoint.every_steps=2", "checkpoint.keep=2", "logging.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU, same kernels every run: bitwise-equal losses


def start(run: Path, *extra: str, command: tuple[str, ...] = ("-m", "automodel_cli")) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *command, *ARGS, "-o", str(run), *extra],
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


def kill_then_resume(start: Callable[..., subprocess.Popen], run: Path, step: int, timeout: float = 600) -> str:
    """Start ``run`` (``start(run, *extra)``), SIGKILL it once ``step`` is logged, check that it
    wrote no final model, then resume it with ``checkpoint.resume=auto`` to the end; the resumed
    process's stdout. Any recipe's kill -9 test is this and a comparison of the losses."""
    proc = start(run)
    wait_for_step(run, step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    resumed = start(run, "checkpoint.resume=auto")
    out, err = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    return out


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


@pytest.mark.parametrize("extra", [[], ["checkpoint.async=true"]], ids=["blocking", "async"])
def test_sigterm_saves_a_checkpoint_and_resume_matches(reference, tmp_path, extra):
    """With checkpoint.async the checkpoint in flight is published first and the stop's own
    checkpoint is written before the run exits."""
    run = tmp_path / "terminated"
    proc = start(run, *extra)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = len(losses(run))
    assert stopped_at < STEPS
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"
    assert "checkpoint.resume=auto" in out
    assert not list((run / "checkpoints").glob(".tmp-*"))
    resumed = start(run, "checkpoint.resume=auto", *extra)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert losses(run) == reference


#: The CLI with the background hashing of checkpoint step 8 held up: it signals that it started
#: (the shards are written, nothing is published) and never ends, so the kill lands mid-write.
HELD_UP_AT_STEP_8 = """
import pathlib, sys, time
from automodel_cli.cli import main
from automodel_cli.components.checkpoint import save

marker, real = pathlib.Path(sys.argv[1]), save._hash_owned

def held_up(directory, rank, world):
    if directory.name.startswith(".tmp-step_00000008-"):
        marker.write_text("writing step 8")
        time.sleep(3600)
    return real(directory, rank, world)

save._hash_owned = held_up
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_sigkill_during_a_background_write_then_resume_matches(reference, tmp_path):
    run, marker = tmp_path / "async", tmp_path / "writing"
    proc = start(run, "checkpoint.async=true", command=("-c", HELD_UP_AT_STEP_8, str(marker)))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the background write of step 8 never started"
        time.sleep(0.02)
    wait_for_step(run, 9, proc)  # training goes on while step 8 is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"  # the previous one is in charge
    assert [p.name for p in checkpoints.glob(".tmp-step_00000008-*")] and not (checkpoints / "step_00000008").exists()
    resumed = start(run, "checkpoint.resume=auto", "checkpoint.async=true")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from {checkpoints / 'step_00000006'} at step 6" in out
    assert losses(run) == reference  # every step, bitwise, as the blocking saves of the reference run
    assert not list(checkpoints.glob(".tmp-*"))
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]
