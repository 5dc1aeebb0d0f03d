"""Resuming with changed settings: optimizer and schedule changes are refused unless asked for,
then applied from the resumed step on, logged and recorded; the saved config is always the one
in force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automodel_cli.components.optim.build import lr_multiplier

#: The learning rate is pinned (not the demo preset's) because the expected messages name it.
BASE = ["finetune", "demo", "train.global_batch_size=16", "train.micro_batch_size=16", "train.eval_every_steps=null",
        "data.eval_split=null", "checkpoint.every_steps=2", "logging.progress=false", "optim.lr=3e-3"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(cli, tmp_path):
    """A finished 4-step run with a cosine schedule and checkpoints."""
    run = tmp_path / "run"
    result = cli(*BASE, "-o", str(run), "train.max_steps=4", "optim.warmup_steps=1")
    assert result.exit_code == 0, result.stderr
    return run


@pytest.mark.parametrize("change, listed", [
    (["optim.lr=1e-3"], "optim.lr: saved 0.003, now 0.001"),
    (["train.max_steps=8"], "train.max_steps: saved 4, now 8"),  # extending a finished cosine schedule
    (["optim.scheduler=linear", "optim.betas=[0.8,0.9]"], "optim.scheduler: saved 'cosine', now 'linear'"),
])
def test_schedule_changes_are_refused_and_nothing_is_touched(cli, trained, change, listed):
    before = snapshot(trained)
    result = cli(*BASE, "-o", str(trained), "train.max_steps=4", "optim.warmup_steps=1", *change,
                 "checkpoint.resume=auto")
    assert result.exit_code == 2
    assert listed in result.stderr and "checkpoint.allow_changes=true" in result.stderr
    assert snapshot(trained) == before


def test_allowed_changes_are_applied_from_the_resumed_step_logged_and_recorded(cli, trained):
    result = cli(*BASE, "-o", str(trained), "train.max_steps=8", "optim.warmup_steps=1", "optim.lr=1e-3",
                 "checkpoint.resume=auto", "checkpoint.allow_changes=true")
    assert result.exit_code == 0, result.stderr
    assert "changed on resume: optim.lr: 0.003 -> 0.001" in result.stdout
    assert "changed on resume: train.max_steps: 4 -> 8" in result.stdout
    steps = metrics(trained)
    assert [m["step"] for m in steps] == list(range(1, 9))
    # Steps 1-4 ran the old schedule; steps 5-8 the new one, as if it had been used from the start.
    for m in steps[4:]:
        expected = 1e-3 * lr_multiplier(m["step"] - 1, warmup=1, total=8, kind="cosine", min_ratio=0.0)
        assert m["lr"] == pytest.approx(expected, rel=1e-12)
    old = [3e-3 * lr_multiplier(s, warmup=1, total=4, kind="cosine", min_ratio=0.0) for s in range(4)]
    assert [m["lr"] for m in steps[:4]] == pytest.approx(old, rel=1e-12)
    from automodel_cli.config.yaml_io import load_yaml_file

    saved, _ = load_yaml_file(trained / "config.yaml")
    assert saved["optim"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 8  # the settings in force now
    (entry,) = [json.loads(line) for line in (trained / "config_history.jsonl").read_text().splitlines()]
    assert entry["step"] == 4
    assert entry["changed"]["optim.lr"] == {"before": 3e-3, "after": 1e-3}
    assert entry["changed"]["train.max_steps"] == {"before": 4, "after": 8}


def test_a_constant_schedule_can_be_extended_without_asking(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*BASE, "-o", str(run), "train.max_steps=4", "optim.scheduler=constant").exit_code == 0
    result = cli(*BASE, "-o", str(run), "train.max_steps=6", "optim.scheduler=constant", "checkpoint.resume=auto",
                 "checkpoint.keep=5")
    assert result.exit_code == 0, result.stderr
    assert "changed on resume: train.max_steps: 4 -> 6" in result.stdout
    assert "changed on resume: checkpoint.keep: 2 -> 5" in result.stdout
    assert [m["lr"] for m in metrics(run)] == pytest.approx([1e-4 * (s + 1) for s in range(6)])  # demo warmup: 30 steps


def test_an_explicit_checkpoint_of_another_run_is_checked_too(cli, trained, tmp_path):
    target = tmp_path / "continued"
    result = cli(*BASE, "-o", str(target), "train.max_steps=4", "optim.warmup_steps=1", "optim.lr=5e-4",
                 f"checkpoint.resume={trained / 'checkpoints' / 'step_00000004'}")
    assert result.exit_code == 2 and "optim.lr: saved 0.003, now 0.0005" in result.stderr
    assert not target.exists()  # nothing left behind
