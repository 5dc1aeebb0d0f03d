"""``log_step`` and ``step_rates`` (training/loop.py), shared by every training recipe:
a non-finite loss is warned about, validation runs when due, every step reaches the metrics
file, and the other loggers get the steps ``train.log_every_steps`` selects (the real
TrainingProgress and JsonlLogger)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from automodel_cli.components.logging.jsonl import JsonlLogger
from automodel_cli.training.loop import log_step, step_rates
from automodel_cli.components.training.progress import TrainingProgress


def cfg(every, log_every=1):
    return SimpleNamespace(train=SimpleNamespace(eval_every_steps=every, log_every_steps=log_every))


def logged(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_is_warned_about_and_still_logged(tmp_path, capsys, loss):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    with TrainingProgress(10, 0, enabled=False) as progress:
        result = log_step(cfg(None), 3, 10, {"step": 3, "loss": loss, "tokens_per_s": 1.0},
                          evaluate=lambda: {"eval_loss": 1.0}, describe=str, loggers=[logger], progress=progress)
    logger.close()
    assert result is None  # no validation due at step 3 of 10
    assert f"warning: loss is {loss} at step 3" in capsys.readouterr().err
    assert [row["step"] for row in logged(tmp_path / "metrics.jsonl")] == [3]


def test_finite_losses_are_quiet_and_validation_runs_when_due(tmp_path, capsys):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    metrics = {"step": 4, "loss": 2.5, "tokens_per_s": 1.0}
    with TrainingProgress(10, 0, enabled=False) as progress:
        result = log_step(cfg(2), 4, 10, metrics, evaluate=lambda: {"eval_loss": 1.5},
                          describe=lambda r: f"eval {r['eval_loss']}", loggers=[logger], progress=progress)
    logger.close()
    assert result == {"eval_loss": 1.5}
    assert logged(tmp_path / "metrics.jsonl")[0]["eval_loss"] == 1.5
    err = capsys.readouterr().err
    assert "step 4: eval 1.5" in err and "warning" not in err


def test_other_loggers_get_every_nth_step_the_last_and_validated_ones(tmp_path):
    """metrics.jsonl (the first logger) gets every step; another logger steps 3 and 6
    (log_every_steps=3), 4 (validated: eval_every_steps=4) and 7 (the last)."""
    first, other = JsonlLogger(tmp_path / "metrics.jsonl"), JsonlLogger(tmp_path / "other.jsonl")
    with TrainingProgress(7, 0, enabled=False) as progress:
        for step in range(1, 8):
            log_step(cfg(4, log_every=3), step, 7, {"step": step, "loss": 1.0, "tokens_per_s": 1.0},
                     evaluate=lambda: {"eval_loss": 0.5}, describe=str, loggers=[first, other], progress=progress)
    first.close()
    other.close()
    assert [row["step"] for row in logged(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7]
    assert [row["step"] for row in logged(tmp_path / "other.jsonl")] == [3, 4, 6, 7]


def test_step_rates():
    assert step_rates(1000, 2.0, 4) == {"tokens_per_s": 500.0, "tokens_per_s_per_device": 125.0}
