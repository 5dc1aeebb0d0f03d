"""TensorBoard logger: scalars written are read back by TensorBoard's own reader."""

from __future__ import annotations

import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from automodel_cli.components.logging import TensorBoardLogger
from automodel_cli.errors import UserError


def read_scalars(log_dir):
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_scalars_round_trip(tmp_path):
    logger = TensorBoardLogger({}, tmp_path)
    logger.log({"loss": torch.tensor(2.0), "lr": 1e-3, "note": "text is skipped"}, step=1)
    logger.log({"loss": 1.5, "lr": 2e-3, "done": True}, step=2)
    logger.close()
    assert logger.log_dir == tmp_path / "tensorboard"
    scalars = read_scalars(logger.log_dir)
    assert set(scalars) == {"loss", "lr"}
    assert scalars["loss"] == [(1, 2.0), (2, 1.5)]
    assert [s for s, _ in scalars["lr"]] == [1, 2]
    assert scalars["lr"][1][1] == pytest.approx(2e-3)


def test_log_dir_option_and_unknown_option(tmp_path):
    logger = TensorBoardLogger({"log_dir": "tb/run1", "flush_secs": 1}, tmp_path)
    logger.log({"loss": 0.5}, step=7)
    logger.close()
    assert read_scalars(tmp_path / "tb" / "run1")["loss"] == [(7, 0.5)]
    with pytest.raises(UserError, match="Did you mean `log_dir`"):
        TensorBoardLogger({"logdir": "x"}, tmp_path)


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an uninstalled package looks like
    with pytest.raises(UserError) as info:
        TensorBoardLogger({}, tmp_path)
    assert "pip install 'automodel-cli[tensorboard]'" in str(info.value)


def test_histograms_keep_the_given_bins(tmp_path):
    """``log_histograms``: bin i holds counts[i] (tokens per expert), read back by TensorBoard."""
    logger = TensorBoardLogger({}, tmp_path)
    logger.log_histograms({"expert_load/layer0": [3.0, 0.0, 5.0, 1.0]}, step=4)
    logger.close()
    accumulator = EventAccumulator(str(logger.log_dir))
    accumulator.Reload()
    (event,) = accumulator.Histograms("expert_load/layer0")
    value = event.histogram_value
    assert event.step == 4 and value.num == 9 and value.min == 0 and value.max == 3
    assert list(value.bucket) == [3.0, 0.0, 5.0, 1.0]
    assert list(value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    assert value.sum == 0 * 3 + 2 * 5 + 3 * 1 and value.sum_squares == 4 * 5 + 9 * 1
