"""``checkpoint.resume=auto`` with a damaged newest checkpoint resumes from the newest intact
one and says why; a checkpoint named by path is never swapped for another; nothing on disk
changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import tiny, train
from conftest import tree_digest

from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from automodel_cli.components.checkpoint.load import find_intact_checkpoint
from automodel_cli.errors import UserError



@pytest.fixture
def run_dir(tmp_path):
    """Three checkpoints (steps 1-3) of a run; returns the run directory."""
    run = tiny()
    for step in (1, 2, 3):
        train(run, 1)
        save_checkpoint(tmp_path, step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        train_state={"epoch": 0}, keep=3)
    return tmp_path


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {
    "flipped byte (sha256)": (lambda c: flip_byte(c / "model" / "__0_0.distcp"), "sha256 digest does not match"),
    "truncated shard": (lambda c: truncate(c / "optim" / "__0_0.distcp"), "100 bytes, expected"),
    "missing rng file": (lambda c: (c / "rng" / "rank_0.pt").unlink(), "rank_0.pt is missing"),
    "garbled meta.json": (lambda c: (c / "meta.json").write_text("{not json"), "meta.json is corrupted"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_skips_a_damaged_latest_checkpoint(run_dir, damage):
    spoil, reason = DAMAGE[damage]
    spoil(checkpoint(run_dir, 3))
    before = tree_digest(run_dir)
    notes: list[str] = []
    chosen = find_intact_checkpoint(run_dir, note=notes.append)
    assert chosen == checkpoint(run_dir, 2).resolve()
    assert len(notes) == 1, notes
    assert notes[0].startswith("checkpoint.resume=auto: step_00000003 is damaged")
    assert reason in notes[0] and "resuming from step_00000002" in notes[0]
    fresh = tiny(seed=7)
    assert load_checkpoint(chosen, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler,
                           verify=False)["step"] == 2
    assert tree_digest(run_dir) == before


def test_intact_latest_is_used_without_a_note(run_dir):
    notes: list[str] = []
    assert find_intact_checkpoint(run_dir, note=notes.append).name == "step_00000003"
    assert notes == []
    assert find_intact_checkpoint(run_dir.parent / "no-run-here") is None


def test_a_checkpoint_named_by_path_is_refused_not_replaced(run_dir):
    flip_byte(checkpoint(run_dir, 3) / "model" / "__0_0.distcp")
    before = tree_digest(run_dir)
    fresh = tiny(seed=7)
    params = [p.detach().clone() for p in fresh.model.parameters()]
    with pytest.raises(UserError, match=r"step_00000003/model/__0_0\.distcp is corrupted .*sha256"):
        load_checkpoint(find_checkpoint(str(checkpoint(run_dir, 3)), run_dir), model=fresh.model,
                        optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.model.parameters()))
    assert tree_digest(run_dir) == before


def test_no_intact_checkpoint_is_a_clear_error(run_dir):
    for step in (1, 2, 3):
        truncate(checkpoint(run_dir, step) / "optim" / "__0_0.distcp")
    before = tree_digest(run_dir)
    with pytest.raises(UserError) as caught:
        find_intact_checkpoint(run_dir)
    error = caught.value
    assert error.message.startswith("checkpoint.resume=auto found no intact checkpoint in")
    assert all(f"step_0000000{step} is damaged" in error.message for step in (1, 2, 3))
    assert "resume=auto" not in error.hint and "Move the damaged checkpoints" in error.hint
    assert tree_digest(run_dir) == before


def test_a_newer_format_is_not_skipped_as_damage(run_dir):
    meta_path = checkpoint(run_dir, 3) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 99"):
        find_intact_checkpoint(run_dir)
