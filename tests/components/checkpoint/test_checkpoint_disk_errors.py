"""A save that the disk refuses (full, a file-size limit) is a UserError naming the intact
previous checkpoint; that checkpoint stays byte-identical and a resume uses it.

Two real ways to make writes fail: a small tmpfs (a real ENOSPC; needs permission to mount,
skipped otherwise) and RLIMIT_FSIZE (a real EFBIG on any Linux; Python ignores SIGXFSZ, so the
write fails instead of killing the process). The limit is set for the save only and restored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_helpers import tiny, train
from conftest import tree_digest

from automodel_cli.components.checkpoint import load_checkpoint, save_checkpoint
from automodel_cli.components.checkpoint.load import find_intact_checkpoint
from automodel_cli.components.checkpoint.save import start_checkpoint
from automodel_cli.components.checkpoint.storage import storage_error
from automodel_cli.errors import UserError

HIDDEN = 256  # a checkpoint of about 500 KB, its largest file (optimizer shard) about 320 KB



def save(run, run_dir: Path, step: int) -> Path:
    return save_checkpoint(run_dir, step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                           train_state={"epoch": 0}, keep=2)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of that size (skips when mounting is not allowed here)."""
    point = tmp_path / "disk"
    point.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def refused_second_save(run_dir: Path, refusing: contextlib.AbstractContextManager,
                        background: bool = False) -> tuple[str, Any]:
    """Save step 1, train a step, save step 2 while ``refusing`` makes the disk refuse it; check
    that step 1 stayed byte-identical (no scratch left) and that a resume restores it exactly.
    ``background``: step 2's shards are written in the background, so the refusal surfaces only
    when the save is finished. Returns the error message and the run."""
    run = tiny(hidden=HIDDEN)
    train(run, 1)
    save(run, run_dir, 1)
    saved = [p.detach().clone() for p in run.model.parameters()]
    before = tree_digest(run_dir)
    train(run, 1)
    started = False
    with refusing, pytest.raises(UserError) as caught:
        pending = start_checkpoint(run_dir, 2, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                   train_state={"epoch": 0}, keep=2, background=background)
        started = True
        if background:
            train(run, 1)  # training goes on while the shard the disk refuses is being written
        pending.finish()
    assert started == background  # a blocking save fails at once, a background one when finished
    assert tree_digest(run_dir) == before
    path = find_intact_checkpoint(run_dir)
    assert path is not None and path.name == "step_00000001"
    fresh = tiny(seed=9, hidden=HIDDEN)
    assert load_checkpoint(path, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(saved, fresh.model.parameters()))
    return caught.value.render(), run


@pytest.mark.parametrize("background", [False, True], ids=["blocking", "background"])
def test_full_disk_keeps_the_previous_checkpoint(small_disk, background):
    run_dir = small_disk("800k") / "run"
    message, _ = refused_second_save(run_dir, contextlib.nullcontext(), background)
    for fragment in ("Could not save checkpoint step_00000002", "no space left on the device",
                     "a checkpoint of this run takes about", "KiB is free there now",
                     "the previous checkpoint, step_00000001, is intact",
                     f"checkpoint.resume=auto --output-dir {run_dir}"):
        assert fragment in message, message


@pytest.mark.parametrize("background", [False, True], ids=["blocking", "background"])
def test_file_size_limit_keeps_the_previous_checkpoint(tmp_path, background):
    message, run = refused_second_save(tmp_path, file_size_limit(100_000), background)
    for fragment in ("Could not save checkpoint step_00000002", "ulimit -f", "while writing",
                     "step_00000001, is intact", "checkpoint.resume=auto"):
        assert fragment in message, message
    save(run, tmp_path, 2)  # with the limit gone the same save works
    assert find_intact_checkpoint(tmp_path).name == "step_00000002"


def test_first_checkpoint_failing_says_there_is_none_to_resume(tmp_path):
    run = tiny(hidden=HIDDEN)
    train(run, 1)
    with file_size_limit(100_000), pytest.raises(UserError) as caught:
        save(run, tmp_path, 1)
    message = caught.value.render()
    assert "there is no earlier checkpoint" in message and "starts again from step 0" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []


def test_other_os_errors_stay_errors(tmp_path, monkeypatch):
    """Only disk errors are the user's to fix; anything else keeps its traceback."""
    from automodel_cli.components.checkpoint import save as save_module

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(save_module, "capture_rng_state", broken)
    run = tiny()
    with pytest.raises(OSError, match="Input/output error"):
        save(run, tmp_path, 1)


def test_disk_errors_are_found_inside_the_wrappers_torch_and_safetensors_use(tmp_path):
    """torch.save reports a full disk as a RuntimeError whose context is the OSError, and
    safetensors as a SafetensorError naming the OS error number."""
    from safetensors.torch import save_file

    with file_size_limit(10_000), pytest.raises(RuntimeError) as torch_error, open(tmp_path / "w.pt", "wb") as f:
        torch.save({"w": torch.zeros(100_000)}, f)
    assert storage_error(torch_error.value).errno == errno.EFBIG

    with file_size_limit(10_000), pytest.raises(Exception) as safetensors_error:
        save_file({"w": torch.zeros(100_000)}, str(tmp_path / "w.safetensors"))
    assert storage_error(safetensors_error.value).errno == errno.EFBIG
    assert storage_error(RuntimeError("something else")) is None
