"""``log_step`` and ``step_rates`` (training/loop.py), shared by every training recipe:
a non-finite loss is warned about, validation runs when due, and every step reaches the metrics
file and the progress display (the real TrainingProgress and JsonlLogger)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from automodel_cli.components.logging.jsonl import JsonlLogger
from automodel_cli.training.loop import log_step, step_rates
from automodel_cli.components.training.progress import TrainingProgress


def cfg(every):
    return SimpleNamespace(train=SimpleNamespace(eval_every_steps=every))


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


def test_step_rates():
    assert step_rates(1000, 2.0, 4) == {"tokens_per_s": 500.0, "tokens_per_s_per_device": 125.0}
