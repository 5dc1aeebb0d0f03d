"""Crash safety, the ``latest`` pointer, pruning and ``find_checkpoint``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import tiny, train

from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from automodel_cli.components.checkpoint import save as save_module
from automodel_cli.components.checkpoint import state as state_module
from automodel_cli.errors import UserError

HERE = Path(__file__).parent


def save(run, run_dir, step, keep=3):
    return save_checkpoint(run_dir, step, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, train_state={"epoch": 0}, keep=keep)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_loads_as(run_dir: Path, step: int, params: list[torch.Tensor]) -> None:
    """The checkpoint `latest` resolves to is `step` and restores exactly `params`."""
    path = find_checkpoint("auto", run_dir)
    assert path is not None and path.name == f"step_{step:08d}"
    fresh = tiny(seed=42)
    state = load_checkpoint(path, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    assert state["step"] == step
    for a, b in zip(params, fresh.model.parameters()):
        assert torch.equal(a, b)


class Crash(Exception):
    pass


def _crash(*args, **kwargs):
    raise Crash("simulated crash")


def _half_written_optimizer(model, optimizer, directory):
    (directory / "optim").mkdir()
    (directory / "optim" / "__0_0.distcp").write_bytes(b"PK\x03\x04 half a shard")
    raise Crash("simulated crash while writing optim/")


CRASH_POINTS = {
    # where the save dies -> what to patch
    "writing model": (save_module, "save_model_state", _crash),
    "writing optimizer": (save_module, "save_optimizer_state", _half_written_optimizer),
    "writing rng": (save_module, "capture_rng_state", _crash),
    "before publish": (save_module, "publish", _crash),
    "before latest": (save_module.layout, "write_latest", _crash),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, point):
    run = tiny()
    train(run, 1)
    save(run, tmp_path, 1)
    saved_params = [p.detach().clone() for p in run.model.parameters()]
    train(run, 1)

    module, name, replacement = CRASH_POINTS[point]
    with monkeypatch.context() as patch:
        patch.setattr(module, name, replacement)
        with pytest.raises(Crash):
            save(run, tmp_path, 2)

    assert latest(tmp_path) == "step_00000001"
    assert_loads_as(tmp_path, 1, saved_params)
    # No temp directory is left behind by an exception, and nothing half-written is visible.
    names = entries(tmp_path)
    assert not [n for n in names if n.startswith(".tmp-")]
    if point == "before latest":  # published but not yet pointed to: whole, and ignored
        assert "step_00000002" in names
    else:
        assert "step_00000002" not in names

    # The next save works normally.
    save(run, tmp_path, 3)
    assert latest(tmp_path) == "step_00000003"
    assert_loads_as(tmp_path, 3, list(run.model.parameters()))


def test_crash_while_pruning_leaves_latest_intact(tmp_path, monkeypatch):
    run = tiny()
    for step in (1, 2):
        save(run, tmp_path, step, keep=2)
    real_remove = save_module.remove_tree

    def die_deleting_trash(path):
        if path.name.startswith(".trash-"):
            raise Crash("simulated crash while deleting")
        real_remove(path)

    with monkeypatch.context() as patch:
        patch.setattr(save_module, "remove_tree", die_deleting_trash)
        with pytest.raises(Crash):
            save(run, tmp_path, 3, keep=2)  # step 1 was renamed to .trash-*, then "died"
    assert latest(tmp_path) == "step_00000003"
    assert any(n.startswith(".trash-step_00000001") for n in entries(tmp_path))
    assert_loads_as(tmp_path, 3, list(run.model.parameters()))
    save(run, tmp_path, 4, keep=2)
    assert entries(tmp_path) == ["latest", "step_00000003", "step_00000004"]


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {here!r})
    from checkpoint_helpers import tiny, train
    from automodel_cli.components.checkpoint import save_checkpoint

    run_dir = Path(sys.argv[1])
    run = tiny()
    train(run, 1)
    save_checkpoint(run_dir, 1, model=run.model, optimizer=run.optimizer,
                    scheduler=run.scheduler, train_state={{}}, keep=2)
    print("saved 1", flush=True)
    train(run, 1)

    from automodel_cli.components.checkpoint import save as save_module
    {dying}
    print("not reached", flush=True)
""")

DIE_WRITING_OPTIMIZER = """
    real_save = save_module.save_optimizer_state
    def dying_save(model, optimizer, directory):
        # Write the optimizer shards, cut one in half, then die without any chance to clean up.
        real_save(model, optimizer, directory)
        shard = directory / "optim" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    save_module.save_optimizer_state = dying_save
    save_checkpoint(run_dir, 2, model=run.model, optimizer=run.optimizer,
                    scheduler=run.scheduler, train_state={}, keep=2)
"""

DIE_IN_BACKGROUND = """
    def dying_hash(directory, rank, world):
        # The background thread has written the shards; the process dies before it publishes.
        os.kill(os.getpid(), signal.SIGKILL)
    save_module._hash_owned = dying_hash
    pending = save_module.start_checkpoint(run_dir, 2, model=run.model, optimizer=run.optimizer,
                                           scheduler=run.scheduler, train_state={}, keep=2, background=True)
    train(run, 1)  # training goes on in the main thread meanwhile
    pending.finish()
"""


@pytest.mark.parametrize("dying", [DIE_WRITING_OPTIMIZER, DIE_IN_BACKGROUND], ids=["blocking", "background"])
def test_sigkill_mid_save_keeps_previous_and_next_save_cleans_up(tmp_path, dying):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(here=str(HERE), dying=textwrap.dedent(dying)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == ["saved 1"]

    leftovers = [n for n in entries(tmp_path) if n.startswith(".tmp-step_00000002-")]
    assert len(leftovers) == 1
    scratch = tmp_path / "checkpoints" / leftovers[0]
    assert (scratch / "model" / ".metadata").exists() and (scratch / "optim" / "__0_0.distcp").exists()
    assert not (scratch / "meta.json").exists()
    assert latest(tmp_path) == "step_00000001"

    expected = tiny()
    train(expected, 1)
    assert_loads_as(tmp_path, 1, list(expected.model.parameters()))

    save(expected, tmp_path, 2)
    assert entries(tmp_path) == ["latest", "step_00000001", "step_00000002"]


def test_scratch_of_a_live_process_is_left_alone(tmp_path):
    run = tiny()
    save(run, tmp_path, 1)
    root = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f".tmp-step_00000005-{sleeper.pid}"
        live.mkdir()
        dead = root / ".tmp-step_00000004-999999999"
        dead.mkdir()
        save(run, tmp_path, 2)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"


def test_prune_keeps_newest_and_latest(tmp_path):
    run = tiny()
    for step in (1, 2, 3, 4):
        save(run, tmp_path, step, keep=2)
    assert entries(tmp_path) == ["latest", "step_00000003", "step_00000004"]
    # Re-saving an existing step replaces it and keeps it as latest.
    train(run, 1)
    save(run, tmp_path, 4, keep=2)
    assert latest(tmp_path) == "step_00000004"
    assert_loads_as(tmp_path, 4, list(run.model.parameters()))
    # Saving an older step (resumed from an earlier checkpoint) never deletes what it wrote;
    # "newest" is by step, so the higher step survives too and `latest` decides what resumes.
    save(run, tmp_path, 2, keep=1)
    assert entries(tmp_path) == ["latest", "step_00000002", "step_00000004"]
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"
    with pytest.raises(UserError, match="checkpoint.keep"):
        save(run, tmp_path, 5, keep=0)


def test_find_checkpoint_specs(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert find_checkpoint("auto", run_dir) is None  # nothing saved yet: start fresh
    for off in ("off", False, None, "none", "OFF"):
        assert find_checkpoint(off, run_dir) is None
    run = tiny()
    first = save(run, run_dir, 1)
    second = save(run, run_dir, 2)
    assert find_checkpoint("auto", run_dir) == second
    assert find_checkpoint(True, run_dir) == second
    assert find_checkpoint(str(first), tmp_path / "elsewhere") == first.resolve()
    assert find_checkpoint(run_dir, tmp_path / "elsewhere") == second.resolve()  # a run dir
    assert find_checkpoint(run_dir / "checkpoints", tmp_path) == second.resolve()
    assert find_checkpoint("checkpoints/step_00000001", run_dir) == first.resolve()  # relative to run
    monkeypatch.chdir(run_dir)
    assert find_checkpoint("checkpoints/step_00000002", tmp_path / "x") == second.resolve()

    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nope"), run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a checkpoint"):
        find_checkpoint(str(tmp_path / "empty"), run_dir)


def test_latest_pointer_damage_falls_back_to_newest(tmp_path):
    run = tiny()
    save(run, tmp_path, 1)
    save(run, tmp_path, 2)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step_00000009\n")  # names a directory that is gone
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"
    pointer.write_text("\x00garbage")
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"
    pointer.unlink()
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"
    # A half-written directory (no meta.json) is never taken for a checkpoint.
    (tmp_path / "checkpoints" / "step_00000003").mkdir()
    assert find_checkpoint("auto", tmp_path).name == "step_00000002"


def test_state_io_is_swappable():
    """save.py reaches model/optimizer I/O only through these names (the DCP seam)."""
    for name in ("save_model_state", "save_optimizer_state", "save_scheduler_state"):
        assert getattr(save_module, name) is getattr(state_module, name)
    assert os.path.basename(state_module.__file__) == "state.py"
