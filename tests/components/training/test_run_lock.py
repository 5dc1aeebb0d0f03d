"""One run per output directory: a second run is refused naming the holder, a killed holder's
lock is taken over, an unusable directory is reported before anything loads."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automodel_cli.components.training import run_lock
from automodel_cli.errors import UserError
from conftest import run_cli

FAST = ["train.max_steps=1", "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false"]

HOLDER = """
import sys, time
from pathlib import Path
from automodel_cli.components.training import run_lock
run_lock.acquire(Path(sys.argv[1]), "finetune")
print("held", flush=True)
time.sleep(600)
"""


def hold(directory: Path) -> subprocess.Popen:
    """Another process holding the directory's lock, through the real locking code."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_second_run_is_refused_naming_the_holder_and_nothing_is_touched(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        before = snapshot(run)
        result = run_cli("finetune", "demo", "-o", str(run), *FAST)
        assert result.exit_code == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "is in use by another run" in result.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in result.stderr
        assert snapshot(run) == before
        # Resuming does not get around it either.
        result = run_cli("finetune", "demo", "-o", str(run), "checkpoint.resume=auto", *FAST)
        assert result.exit_code == 2 and "in use by another run" in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_is_taken_over_with_a_note(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = run_cli("finetune", "demo", "-o", str(run), *FAST)
    assert result.exit_code == 0, result.stderr
    assert f"previous run in this directory (pid {holder.pid}" in result.stdout
    assert "ended without releasing its lock" in result.stdout
    record = json.loads((run / run_lock.LOCK_FILE).read_text())
    assert record["pid"] != holder.pid and record["released"]  # this run's record, released at exit
    assert (run / "final" / "config.json").exists()


def test_release_lets_the_next_run_in_and_records_nothing_stale(tmp_path):
    lock = run_lock.acquire(tmp_path / "run", "finetune")
    run_lock.mark_writing(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert run_lock.holder(tmp_path / "run")["pid"] == os.getpid()
    lock.release()
    assert run_lock.holder(tmp_path / "run") is None
    again = run_lock.acquire(tmp_path / "run", "finetune")
    assert run_lock.stale_note(again) is None  # released cleanly: nothing to report
    again.release()


def test_a_refused_run_leaves_an_existing_directory_byte_identical(tmp_path):
    """A run that takes the lock and is then refused (a bad setting found later) restores the
    lock file it found; one that found none removes its own."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    run_lock.acquire(run, "finetune").release()
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    (run / run_lock.LOCK_FILE).write_text('{"pid": 1, "host": "h", "released": "x"}\n')
    before = snapshot(run)
    run_lock.acquire(run, "finetune").release()
    assert snapshot(run) == before


def test_a_run_that_fails_early_leaves_no_directory_behind(tmp_path):
    run = tmp_path / "new" / "run"
    result = run_cli("finetune", "demo", "-o", str(run), "data.name=auto", f"data.path={tmp_path / 'missing.jsonl'}",
                     *FAST)
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("output_dir, reason", [
    ("/proc/automodel-run", "No such file or directory"),
    ("{file}/run", "Not a directory"),
])
def test_unusable_output_dir_is_reported_before_anything_loads(tmp_path, output_dir, reason):
    afile = tmp_path / "afile"
    afile.write_text("x")
    target = output_dir.format(file=afile)
    result = run_cli("finetune", "demo", "-o", target, *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"output_dir `{target}` cannot be created or written" in result.stderr and reason in result.stderr
    assert "train data" not in result.stdout  # refused before the data loaded


def test_read_only_directory_is_reported(tmp_path, monkeypatch):
    """Permission bits do not stop root, so the read-only case is the write probe failing."""
    real = run_lock.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if kwargs.get("dir") == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))
        return real(*args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(run_lock.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match="Read-only file system"):
        run_lock.acquire(tmp_path / "ro", "finetune")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("record, refused", [
    ({"host": "elsewhere.example", "pid": 1}, True),  # another host: cannot tell, trust it
    ({"host": socket.gethostname(), "pid": os.getppid()}, True),  # alive here
    ({"host": socket.gethostname(), "pid": 2**22 + 12345}, False),  # gone: taken over
    ({"host": socket.gethostname(), "pid": os.getppid(), "released": "yes"}, False),
])
def test_without_flock_the_record_decides(tmp_path, monkeypatch, record, refused):
    """Some network/FUSE filesystems have no flock: a holder on this host whose pid is gone
    is taken over; one on another host is trusted until its lock file is deleted."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.LOCK_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    if refused:
        with pytest.raises(UserError, match=f"pid {record['pid']} on host {record['host']}"):
            run_lock.acquire(run, "finetune")
    else:
        lock = run_lock.acquire(run, "finetune")
        assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()  # wrote nothing: the directory is left as it was found
        assert json.loads((run / run_lock.LOCK_FILE).read_text()) == record


@pytest.mark.slow
def test_multi_process_run_refused_on_every_rank_without_hanging(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        started = time.monotonic()
        result = run_cli("finetune", "demo", "-o", str(run), "--nproc-per-node", "2", *FAST,
                         env={"CUDA_VISIBLE_DEVICES": ""}, timeout=240)
        assert result.exit_code != 0
        assert "is in use by another run" in result.stderr + result.stdout
        assert time.monotonic() - started < 200
    finally:
        holder.kill()
        holder.wait()
