"""The built-in loggers plugin: registered through the plugin host, cheap to import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from automodel_cli import hookimpl
from automodel_cli.components.logging import JsonlLogger, MetricLogger, TensorBoardLogger, read_metrics
from automodel_cli.plugin_host import PluginHost


@pytest.fixture
def loggers():
    from automodel_cli.plugins import loggers as plugin

    host = PluginHost(autoload=False, strict=True)
    host.register(plugin, name="builtin-loggers", distribution="automodel-cli", version="0.1.0")
    return host.build_registries().loggers


def test_registers_three_loggers_with_requirements(loggers):
    assert loggers.names() == ["jsonl", "tensorboard", "wandb"]
    assert loggers.get("wandb").metadata["requires"] == ["wandb"]
    assert loggers.get("tensorboard").metadata["requires"] == ["tensorboard"]
    assert loggers.get("jsonl").metadata["requires"] == []
    assert str(loggers.get("jsonl").provider) == "automodel-cli 0.1.0"
    assert all(isinstance(entry.target, str) for entry in loggers)


def test_factories_share_one_signature(loggers, tmp_path):
    built = {}
    for name in ("jsonl", "tensorboard"):
        factory = loggers.get(name).load()
        built[name] = factory(output_dir=tmp_path, options={}, run_config={"optim": {"lr": 1}})
        assert isinstance(built[name], MetricLogger)
    assert isinstance(built["jsonl"], JsonlLogger) and isinstance(built["tensorboard"], TensorBoardLogger)
    built["jsonl"].log({"loss": 1.0}, 1)
    for logger in built.values():
        logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert loggers.get("jsonl").option_table() == {}  # its place in the run directory is fixed


def test_importing_the_plugin_and_logging_package_stays_light():
    code = ("import sys, automodel_cli.plugins.loggers, automodel_cli.components.logging, "
            "automodel_cli.components.logging.factories, automodel_cli.components.checkpoint; "
            "heavy = sorted(m for m in ('torch', 'wandb', 'tensorboard', 'transformers') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


class NeedsAMissingModule:
    """A plugin logger whose backend is not installed here."""

    @staticmethod
    @hookimpl
    def register_loggers(registry):
        registry.add("remote", "automodel_cli.components.logging.factories:jsonl",
                     requires=["automodel_backend_that_is_not_installed"])


def test_a_plugin_loggers_missing_module_stops_the_run_before_it_writes(cli, automodel_plugin, tmp_path):
    """The hint names the module to install (not an automodel extra), and the directory does
    not hold a run afterwards: the same command runs there once the logger is dropped."""
    automodel_plugin(NeedsAMissingModule(), name="remote-logger")
    run = tmp_path / "run"
    args = ("finetune", "demo", "-o", str(run), "train.max_steps=1", "data.eval_split=null",
            "train.eval_every_steps=null", "logging.progress=false")
    result = cli(*args, "logging.loggers=[remote]")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert ("Logger `remote` (plugin remote-logger) needs automodel_backend_that_is_not_installed, which is not "
            "installed. Install it (pip install automodel_backend_that_is_not_installed)") in message
    assert not (run / "config.yaml").exists()
    assert cli(*args).exit_code == 0
