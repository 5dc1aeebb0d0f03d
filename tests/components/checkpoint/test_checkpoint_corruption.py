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


FILES = ["model/__0_0.distcp", "model/.metadata", "optim/__0_0.distcp", "optim/.metadata",
         "scheduler.pt", "rng/rank_0.pt", "train_state.json", "meta.json"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_file_is_named(checkpoint, name, damage):
    target = checkpoint / name
    truncate(target) if damage == "truncate" else target.unlink()
    with pytest.raises(UserError) as info:
        load(checkpoint)
    assert name in info.value.message
    assert "Traceback" not in str(info.value)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_digests(checkpoint):
    """What an attacker (or a careless hand edit) would do: make meta.json agree with the files."""
    from automodel_cli.components.checkpoint.dcp_io import sha256_file

    meta = json.loads((checkpoint / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = {"size": (checkpoint / name).stat().st_size,
                               "sha256": sha256_file(checkpoint / name)}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_flipped_byte_in_a_shard_is_named(checkpoint):
    shard = checkpoint / "model" / "__0_0.distcp"
    flip_byte(shard, shard.stat().st_size // 2)
    with pytest.raises(UserError, match=r"model/__0_0\.distcp is corrupted .*sha256"):
        load(checkpoint)


def test_truncation_is_caught_without_digests(checkpoint):
    """verify=False skips hashing, but sizes and the DCP index are still checked."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    truncate(checkpoint / "optim" / "__0_0.distcp")
    meta["files"]["optim/__0_0.distcp"]["size"] = (checkpoint / "optim" / "__0_0.distcp").stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    run = tiny(seed=5)
    with pytest.raises(UserError, match=r"optim/__0_0\.distcp is corrupted or truncated .*the index refers to"):
        load_checkpoint(checkpoint, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        verify=False)


def test_garbage_dcp_index(checkpoint):
    (checkpoint / "model" / ".metadata").write_bytes(b"\xff" * 64)
    rewrite_digests(checkpoint)
    with pytest.raises(UserError, match=r"model/\.metadata is corrupted"):
        load(checkpoint)


class Exploit:
    """Unpickling this would create a file: the classic pickle code-execution payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_never_executed(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    with open(checkpoint / "scheduler.pt", "wb") as f:
        torch.save({"last_epoch": 1, "payload": Exploit(marker)}, f, pickle_module=pickle)
    rewrite_digests(checkpoint)
    with pytest.raises(UserError, match=r"scheduler\.pt .*never unpickled"):
        load(checkpoint)
    assert not marker.exists()


def test_pickled_dcp_index_is_never_executed(checkpoint, tmp_path):
    """Stock DCP reads .metadata with plain pickle.load; ours allows DCP metadata classes only."""
    marker = tmp_path / "pwned"
    (checkpoint / "optim" / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    rewrite_digests(checkpoint)
    with pytest.raises(UserError, match=r"optim/\.metadata is corrupted .*refusing to load `[\w.]*open`"):
        load(checkpoint)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pickled_dcp_value_is_never_executed(tmp_path):
    """Stock DCP loads non-tensor values with weights_only=False; ours with weights_only=True."""
    import torch.distributed.checkpoint as dcp

    from automodel_cli.components.checkpoint import dcp_io

    marker = tmp_path / "pwned"
    dcp.save({"w": torch.ones(2), "lr": Exploit(marker)}, checkpoint_id=str(tmp_path / "x"))
    assert not marker.exists()  # saving only pickles
    state = {"w": torch.zeros(2), "lr": 0.1}
    with pytest.raises(UserError, match=r"Reading checkpoint directory .*x failed .*`lr` holds objects that are never unpickled"):
        dcp_io.load(state, tmp_path / "x", distributed=False)
    assert not marker.exists()
    # A plain value loads fine through the same planner.
    dcp.save({"w": torch.ones(2), "lr": 0.5}, checkpoint_id=str(tmp_path / "y"))
    dcp_io.load(state, tmp_path / "y", distributed=False)
    assert state["lr"] == 0.5 and torch.equal(state["w"], torch.ones(2))


def test_newer_format_version_is_refused(checkpoint):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["format_version"] = 99
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 99"):
        load(checkpoint)


def test_old_single_file_format_is_refused_clearly(checkpoint):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["format_version"] = 1
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 1 .*no longer reads"):
        load(checkpoint)
