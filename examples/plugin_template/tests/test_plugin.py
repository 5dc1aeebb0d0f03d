"""Tests of the plugin with automodel's ``automodel_plugin`` pytest fixture.

The fixture gives each test a plugin host with automodel's built-ins and this plugin only (other
installed plugins take no part), and the CLI run in the test (``main([...])``) uses it. Run them
after ``pip install -e .`` with ``pytest``.
"""

from automodel_cli.cli import main

import automodel_plugin_example
from automodel_plugin_example.data import load_alpaca
from automodel_plugin_example.losses import label_smoothed_cross_entropy


def test_entries_are_registered(automodel_plugin):
    registries = automodel_plugin(automodel_plugin_example)
    assert registries.datasets.get("alpaca_jsonl").load() is load_alpaca
    assert registries.losses.get("label_smoothed_ce").load() is label_smoothed_cross_entropy
    assert registries.models.get("tinyllama").metadata["family"] == "llama"
    # no name taken from a built-in or another plugin, no hook that failed to register
    assert automodel_plugin.host.problems == []


def test_entries_are_listed_with_this_distribution(automodel_plugin, capsys):
    automodel_plugin(automodel_plugin_example)
    assert main(["list", "datasets"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "alpaca_jsonl" in line)
    assert "automodel-plugin-example 0.1.0" in row
