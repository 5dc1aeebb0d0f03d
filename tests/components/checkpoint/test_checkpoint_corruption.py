"""Damaged checkpoints are reported as UserErrors naming the file, and never unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from checkpoint_helpers import tiny, train

from automodel_cli.components.checkpoint import load_checkpoint, save_checkpoint
from automodel_cli.errors import UserError


@pytest.fixture
def checkpoint(tmp_path):
    run = tiny()
    train(run, 1)
    return save_checkpoint(tmp_path, 1, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, train_state={"epoch": 0}, keep=1)


def load(path):
    """Load into a fresh run; on failure, check that the model was left untouched."""
    run = tiny(seed=5)
    before = [p.detach().clone() for p in run.model.parameters()]
    try:
        return load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    except UserError:
        assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
        raise


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                  "train_state.json", "meta.json"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_file_is_named(checkpoint, name, damage):
    target = checkpoint / name
    truncate(target) if damage == "truncate" else target.unlink()
    with pytest.raises(UserError) as info:
        load(checkpoint)
    assert name in info.value.message
    assert "Traceback" not in str(info.value)


def test_garbage_safetensors_header(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match=r"model\.safetensors is corrupted"):
        load(checkpoint)


class Exploit:
    """Unpickling this would create a file: the classic pickle code-execution payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_never_executed(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    with open(checkpoint / "optimizer.pt", "wb") as f:
        torch.save({"state": {}, "param_groups": [], "payload": Exploit(marker)}, f,
                   pickle_module=pickle)
    with pytest.raises(UserError, match=r"optimizer\.pt .*never unpickled"):
        load(checkpoint)
    assert not marker.exists()


def test_newer_format_version_is_refused(checkpoint):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["format_version"] = 99
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 99"):
        load(checkpoint)
