"""Losses from a plugin, through the real CLI in this process: a ``LossSpec`` with its own option
(validated at ``loss.NAME.OPTION``, handed to the function), a plain function (the original
contract), and a spec whose check refuses this machine (a usage error before anything loads)."""

from __future__ import annotations

import torch.nn.functional as F

from automodel_cli import hookimpl
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.loss.spec import LossSpec
from automodel_cli.components.loss.targets import IGNORE_INDEX, as_rows, normaliser
from automodel_cli.config import option
from automodel_cli.errors import UserError
from test_finetune import TINY

#: What the plugin's functions were called with, in call order.
CALLS: list[tuple] = []


def smoothed_cross_entropy(logits, labels, num_label_tokens=None, *, smoothing=0.0):
    CALLS.append(("smoothed", tuple(logits.shape), smoothing))
    rows, targets = as_rows(logits, labels)
    total = F.cross_entropy(rows.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum",
                            label_smoothing=smoothing)
    return total / normaliser(num_label_tokens, targets)


def plain_cross_entropy(logits, labels, num_label_tokens=None):
    CALLS.append(("plain", tuple(logits.shape)))
    return masked_cross_entropy(logits, labels, num_label_tokens)


def needs_a_tpu(device):
    CALLS.append(("check", str(device)))
    raise UserError(f"loss.name=tpu_ce needs a TPU; this run is on {device}.", "Use loss.name=masked_ce here.")


SMOOTHED = LossSpec(kind="logits", fn=smoothed_cross_entropy, rows=True,
                    options={"smoothing": option(float, 0.0, "Label smoothing.", ge=0, lt=1)})


class LossPlugin:
    @staticmethod
    @hookimpl
    def register_losses(registry):
        registry.add("smoothed_ce", SMOOTHED, description="Label-smoothed cross-entropy.")
        registry.add("plain_ce", plain_cross_entropy)
        registry.add("tpu_ce", LossSpec(kind="logits", fn=plain_cross_entropy, check=needs_a_tpu))
        registry.add("smoothed_by_path", f"{__name__}:SMOOTHED")


def finetune(cli, run, *overrides):
    CALLS.clear()
    return cli("finetune", "demo", "-o", str(run), "train.max_steps=1", *TINY, *overrides)


def test_a_plugin_loss_option_is_validated_with_the_config_and_reaches_the_function(cli, automodel_plugin, tmp_path):
    automodel_plugin(LossPlugin())
    shown = cli("config", "show", "demo", "loss.name=smoothed_ce")
    assert "smoothing: 0.0  # from defaults of loss smoothed_ce" in shown.stdout

    bad = finetune(cli, tmp_path / "bad", "loss.name=smoothed_ce", "loss.smoothed_ce.smoothing=2")
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr
    assert "`loss.smoothed_ce.smoothing` must be 0 <= x < 1, got 2" in " ".join(bad.stderr.split())
    assert CALLS == [] and not (tmp_path / "bad").exists()
    typo = finetune(cli, tmp_path / "typo", "loss.name=smoothed_ce", "loss.smoothed_ce.smoothin=0.1")
    assert typo.exit_code == 2 and "`loss.smoothed_ce.smoothing`" in typo.stderr

    result = finetune(cli, tmp_path / "run", "loss.name=smoothed_ce", "loss.smoothed_ce.smoothing=0.25")
    assert result.exit_code == 0, result.stderr
    assert CALLS and all(call[0] == "smoothed" and call[2] == 0.25 for call in CALLS)
    assert all(len(call[1]) == 2 for call in CALLS)  # rows=True: the trained positions' logits only


def test_a_plain_function_loss_gets_the_full_logits(cli, automodel_plugin, tmp_path):
    automodel_plugin(LossPlugin())
    result = finetune(cli, tmp_path / "run", "loss.name=plain_ce")
    assert result.exit_code == 0, result.stderr
    assert CALLS and all(call[0] == "plain" and len(call[1]) == 3 for call in CALLS)  # [batch, seq, vocab]


def test_a_loss_whose_check_refuses_stops_the_run_before_anything_loads(cli, automodel_plugin, tmp_path):
    automodel_plugin(LossPlugin())
    result = finetune(cli, tmp_path / "run", "loss.name=tpu_ce")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "loss.name=tpu_ce needs a TPU; this run is on cpu" in result.stderr
    assert CALLS == [("check", "cpu")]  # the loss never ran
    assert "model:" not in result.stdout and not (tmp_path / "run").exists()


def test_a_spec_with_options_registered_by_its_path_is_refused(cli, automodel_plugin, tmp_path):
    """Its options would be unknown to the config (a path is imported only when a run uses it)."""
    automodel_plugin(LossPlugin())
    result = finetune(cli, tmp_path / "run", "loss.name=smoothed_by_path")
    assert result.exit_code == 2
    assert f"registered by its path `{__name__}:SMOOTHED`, so its options (smoothing) are unknown" in \
        " ".join(result.stderr.split())
    assert CALLS == []
